"""`domain.canonical.dumps_utf8` must give exactly the bytes of the standard encoder: fingerprints stored before it
existed are compared with ones computed by it (the same id with another fingerprint is a CONFLICT)."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from domain import canonical
from domain.model import fingerprint


def reference(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# Text of every kind, short and long (the fast path is for strings of 256 characters and more): control
# characters, quotes, backslashes, non-ASCII, astral characters.
TEXT = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    st.text(st.characters(exclude_categories=["Cs"]), min_size=256, max_size=2000),
    st.text(st.sampled_from(list('ab<>"\\\n\r\t\x00\x08\x0c\x1f\x7få ö🩺\u2028')), min_size=250, max_size=600),
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


def test_unusual_values_fall_back_to_json():
    for value in ({1: "a", 2: "b"}, {"a": (1, 2)}, [float("nan"), float("inf"), -float("inf"), -0.0, 1e300]):
        assert canonical.dumps_utf8(value) == reference(value)


def test_a_document_keeps_its_fingerprint():
    document = "<intyg>\r\n\t<namn>Åsa \"Öberg\" \\ Ängström</namn>\n" * 500
    certificate = {"id": "x", "issued_by": {"name": "Vårdgivare"}, "relations": [],
                   "document": {"media_type": "application/xml", "encoding": "utf-8", "content": document}}
    import hashlib

    assert fingerprint(certificate) == hashlib.sha256(reference(certificate)).hexdigest()
