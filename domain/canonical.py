"""Canonical JSON for fingerprints: exactly `json.dumps(value, sort_keys=True, separators=(",", ":"),
ensure_ascii=False).encode()`, only faster for long strings.

A registration's fingerprint covers its whole content, document included (about 20 KB). The standard library's C
encoder escapes a string that may hold non-ASCII text one character at a time (4-6 ns a character, about 0.1 ms
for a document: the largest single cost of a registration in Python). Here a long string is encoded to UTF-8
first and, unless it holds a control character other than newline, carriage return and tab, escaped with
`bytes.replace`, which runs at memory speed; anything else goes to the standard encoder. In UTF-8 a byte below
0x20 is always that ASCII character, so escaping bytes is escaping characters. The output is identical byte for
byte (a property test compares them), so fingerprints stored before stay valid.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import encode_basestring  # the C function where available
from typing import Any

_LONG = 256  # shorter strings: the C encoder is as fast
# Control characters that json escapes other than as \n, \r, \t (\b and \f included: json writes those short
# forms too, but they are rare enough to leave to the standard encoder).
_RARE_CONTROL = bytes(c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D))


class _Unusual(Exception):
    """A value the fast path does not handle (non-string keys, other types): use json.dumps for all of it."""


def _string(s: str) -> bytes:
    if len(s) < _LONG:
        return encode_basestring(s).encode()
    raw = s.encode()
    if len(raw.translate(None, _RARE_CONTROL)) != len(raw):
        return encode_basestring(s).encode()
    return (b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n").replace(b"\r", b"\\r")
            .replace(b"\t", b"\\t") + b'"')


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value == float("inf"):
        return "Infinity"
    if value == -float("inf"):
        return "-Infinity"
    return float.__repr__(value)


def _encode(value: Any, out: Callable[[str], Any]) -> None:
    if isinstance(value, str):
        out(_string(value))
    elif value is None:
        out(b"null")
    elif value is True:
        out(b"true")
    elif value is False:
        out(b"false")
    elif isinstance(value, int):
        out(int.__repr__(value).encode())
    elif isinstance(value, float):
        out(_float(value).encode())
    elif isinstance(value, dict):
        if not value:
            out(b"{}")
            return
        if not all(isinstance(key, str) for key in value):
            raise _Unusual
        out(b"{")
        first = True
        for key in sorted(value):
            if not first:
                out(b",")
            first = False
            out(_string(key))
            out(b":")
            _encode(value[key], out)
        out(b"}")
    elif isinstance(value, (list, tuple)):
        if not value:
            out(b"[]")
            return
        out(b"[")
        for i, item in enumerate(value):
            if i:
                out(b",")
            _encode(item, out)
        out(b"]")
    else:
        raise _Unusual


def dumps_utf8(value: Any) -> bytes:
    """`json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()`."""
    parts: list[bytes] = []
    try:
        _encode(value, parts.append)
    except (_Unusual, RecursionError):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return b"".join(parts)


__all__ = ["dumps_utf8"]
