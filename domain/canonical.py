"""Canonical JSON for fingerprints: exactly `json.dumps(value, sort_keys=True, separators=(",", ":"),
ensure_ascii=False).encode()`, only faster for long strings.

A registration's fingerprint covers its whole content, document included (about 20 KB). The standard library's C
encoder escapes a string that may hold non-ASCII text one character at a time (3-5 ns a character, about 0.1 ms
for a document: the largest single cost of a registration in Python). Here each long string in the dicts and lists
is replaced by a short marker, the standard encoder (the very one json.dumps uses) encodes the rest, sorting,
numbers, short strings and errors included, and each marker is then replaced by its string encoded to UTF-8 and
escaped with `bytes.replace`, which runs at memory speed. In UTF-8 a byte below 0x80 is always that ASCII
character, so escaping bytes is escaping characters. The output is identical byte for byte (a property test
compares them), so fingerprints stored before stay valid.
"""
from __future__ import annotations

import json
from typing import Any

_LONG = 2048  # shorter strings: the C encoder is as fast (break-even measured at 1,200-2,700 characters)
_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))  # what json.dumps builds
# Every byte JSON escapes, with the escape json itself writes (\", \n, \b, \u001f, ...). Backslash first: the
# escapes written after it hold backslashes that must stay single. The byte is also kept as an int, which
# `in` finds with one memchr, faster than a one-byte bytes.
_ESCAPES = [(byte, bytes([byte]), json.dumps(chr(byte), ensure_ascii=False)[1:-1].encode())
            for byte in b'\\"' + bytes(range(0x20))]
# A lone surrogate has no UTF-8: a value holding one has no canonical bytes (the standard path raises
# UnicodeEncodeError), so when the encoder's text holds exactly as many as the markers put there, all are ours.
_MARK = "\udfff"


def _escaped(s: str) -> bytes:
    """`s` as the standard encoder writes it between the quotes, in UTF-8."""
    raw = s.encode()
    for byte, char, escape in _ESCAPES:
        # 34 memchr passes over a 20 KB document (0.2 us each, most find nothing) cost less than a single
        # bytes.translate pass to look for the rare ones (0.7 ns a byte)
        if byte in raw:
            raw = raw.replace(char, escape)
    return raw


def _lift(value: dict[Any, Any] | list[Any], long: list[str]) -> dict[Any, Any] | list[Any]:
    """`value`, or a copy in which each long string at any depth of dicts and lists is the marker
    `\\udfff<n>\\udfff`, n its index in `long`. Exact types only: a subclass (its own items(), encode(), ...)
    is left to the encoder, as is a tuple."""
    copy = None
    for key, item in value.items() if type(value) is dict else enumerate(value):
        if type(item) is str:
            if len(item) < _LONG:
                continue
            new: Any = f"{_MARK}{len(long)}{_MARK}"
            long.append(item)
        elif type(item) is dict or type(item) is list:
            new = _lift(item, long)
            if new is item:
                continue
        else:
            continue
        if copy is None:
            copy = value.copy()
        copy[key] = new
    return value if copy is None else copy


def dumps_utf8(value: Any) -> bytes:
    """`json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()`."""
    long: list[str] = []
    try:
        lifted = _lift(value, long) if type(value) is dict or type(value) is list else value
    except RecursionError:  # circular or very deep: the standard encoder's answer, or its error
        return _ENCODER.encode(value).encode()
    text = _ENCODER.encode(lifted)
    if not long:
        return text.encode()
    pieces = text.split(_MARK)  # [before, "0", between, "1", ..., after]: the quotes stay in the text
    if len(pieces) != 2 * len(long) + 1:  # the value holds the marker's surrogate
        return _ENCODER.encode(value).encode()  # raises UnicodeEncodeError
    return b"".join(_escaped(long[int(piece)]) if i % 2 else piece.encode() for i, piece in enumerate(pieces))


__all__ = ["dumps_utf8"]
