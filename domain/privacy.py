"""No personnummer in clear outside the store (CONTRACT §8): a salted one-way tag to correlate log lines about one
patient, and a scrubber for any text that might hold a personnummer or samordningsnummer."""
from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from typing import Any

# YYYYMMDDNNNN / YYMMDD-NNNN and friends, not glued to other digits.
_PERSONNUMMER = re.compile(r"(?<![0-9])(?:(?:19|20)?[0-9]{6}[-+]?[0-9]{4})(?![0-9])")
_MASK = "<personnummer>"

_salt: bytes = secrets.token_bytes(16)  # replaced by set_salt(...) for tags comparable across processes


def set_salt(salt: str) -> None:
    global _salt
    _salt = salt.encode()


def patient_hash(patient_id: str | None) -> str | None:
    """A short, salted, one-way tag for a patient, for correlating log lines; None for None."""
    if not patient_id:
        return None
    digits = patient_id.replace("-", "").replace("+", "")
    return hashlib.sha256(_salt + digits.encode()).hexdigest()[:16]


def scrub(text: str) -> str:
    if len(text) < 10:  # too short to hold a personnummer (10 digits at least): skip the regex
        return text
    return _PERSONNUMMER.sub(_MASK, text)


def scrub_value(value: Any) -> Any:
    """`scrub` every string in `value` (mappings and sequences followed)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {k: scrub_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_value(v) for v in value]
    return value
