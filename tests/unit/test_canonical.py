"""`domain.canonical.dumps_utf8` must give exactly the bytes of the standard encoder: fingerprints stored before it
existed are compared with ones computed by it (the same id with another fingerprint is a CONFLICT)."""
from __future__ import annotations

import hashlib
import json
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import canonical
from domain.model import fingerprint

LONG = canonical._LONG  # strings of this length and more take the fast path


def reference(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# Text of every kind: control characters, quotes, backslashes, non-ASCII, astral characters.
ESCAPED = list('"\\') + [chr(c) for c in range(0x20)]
CHARACTERS = st.characters(exclude_categories=["Cs"]) | st.sampled_from(ESCAPED + list("ab<> å ö🩺\x7f\u2028"))


def repeated(fragment: str, length: int) -> str:
    return (fragment * (length // len(fragment) + 1))[:length]


# Short strings, and long ones around and past the threshold (a random fragment repeated: drawing thousands of
# characters one by one would make the test slow).
TEXT = st.one_of(
    st.text(CHARACTERS, max_size=40),
    st.builds(repeated, st.text(CHARACTERS, min_size=1, max_size=30), st.integers(LONG - 3, LONG + 3)),
    st.builds(repeated, st.text(CHARACTERS, min_size=1, max_size=30), st.integers(LONG, 4 * LONG)),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TEXT, children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(JSON)
def test_same_bytes_as_json_dumps(value):
    assert canonical.dumps_utf8(value) == reference(value)


SHORT_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(CHARACTERS, max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(CHARACTERS, max_size=12), children,
                                                                      max_size=5),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(SHORT_JSON)
def test_same_bytes_when_almost_every_string_takes_the_fast_path(value):
    """The splice of many markers, in whatever order the sorted keys put them."""
    with patch.object(canonical, "_LONG", 2):
        assert canonical.dumps_utf8(value) == reference(value)


def test_every_escaped_character_in_a_long_string():
    for char in ESCAPED:
        value = {"s": (f"a{char}é" * LONG)[:LONG + 1]}
        assert canonical.dumps_utf8(value) == reference(value), repr(char)
    value = ["".join(ESCAPED) * (LONG // len(ESCAPED) + 1), "\x7få\u2028🩺" * LONG]
    assert canonical.dumps_utf8(value) == reference(value)


def test_either_side_of_the_threshold():
    for length in (LONG - 1, LONG, LONG + 1):
        for text in ('"' * length, "\\" * length, "å" * length, "🩺" * length, "\n" * length, "x" * length):
            assert canonical.dumps_utf8({"s": text}) == reference({"s": text})
            assert canonical.dumps_utf8([text]) == reference([text])


def test_many_long_strings_come_out_in_key_order_not_insertion_order():
    long = [f"{n}" * (LONG + n) for n in range(12)]
    value = {"z": long[0], "a": [long[1], {"y": long[2], "b": long[3]}, "short", long[4]], "m": {"k": long[5]},
             "b": [[long[6]], [], {}], "c": {"d": {"e": long[7], "f": 1.5, "g": None}}, "n": long[8],
             long[9]: long[10], "o": (long[11], "tuple")}
    assert canonical.dumps_utf8(value) == reference(value)


def test_what_the_fast_path_leaves_to_the_standard_encoder():
    long = "x\"y" * LONG

    class Text(str):
        pass

    class Mapping(dict):
        pass

    for value in (long, {1: long, 2: "b"}, {3: long, 2.5: [long], -1: "x", False: long}, {"a": (long, 2)},
                  {"s": Text(long)}, {"m": Mapping(a=long)}, [Mapping(b=long, a=long)],
                  [float("nan"), float("inf"), -float("inf"), -0.0, 1e300, long]):
        assert canonical.dumps_utf8(value) == reference(value)


def test_a_lone_surrogate_fails_as_json_dumps_then_encode_does():
    """The markers are a lone surrogate: a value holding one anywhere must still fail, never be spliced."""
    long = "x" * LONG
    for value in ({"a": long, "b": "\udfff"}, {"a": long, "b": "\udfff0\udfff"}, {"a": long, "\udfff0\udfff": 1},
                  {"a": long + "\udfff"}, {"a": long, "b": "\ud800"}, ["\udfff" * LONG, long]):
        with pytest.raises(UnicodeEncodeError):
            reference(value)
        with pytest.raises(UnicodeEncodeError):
            canonical.dumps_utf8(value)


def test_errors_are_the_standard_encoders():
    long = "x" * LONG
    circular: dict = {"a": long}
    circular["self"] = [circular]
    through_a_tuple: list = [long]
    through_a_tuple.append((through_a_tuple,))
    for value, error in ((circular, ValueError), (through_a_tuple, ValueError), ({"a": long, "b": object()}, TypeError),
                         ({"a": long, (1, 2): "b"}, TypeError), ({"a": long, 1: "b"}, TypeError)):
        with pytest.raises(error):
            reference(value)
        with pytest.raises(error):
            canonical.dumps_utf8(value)


def test_a_document_keeps_its_fingerprint():
    document = "<intyg>\r\n\t<namn>Åsa \"Öberg\" \\ Ängström</namn>\n" * 500
    certificate = {"id": "x", "issued_by": {"name": "Vårdgivare"}, "relations": [],
                   "document": {"media_type": "application/xml", "encoding": "utf-8", "content": document}}

    assert fingerprint(certificate) == hashlib.sha256(reference(certificate)).hexdigest()
