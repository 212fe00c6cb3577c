"""The one reply every message with `reply_to` gets (CONTRACT.md §3)."""
from __future__ import annotations

import re
from enum import Enum
from typing import Any

from pydantic import field_validator

from contracts.base import Strict

# Anything shaped like a personnummer (10 or 12 digits, optionally `-`/`+` before the last four). A message may
# echo what the sender wrote (a routing key, a field name, a type), and that may be a personnummer.
_PERSONNUMMER_LIKE = re.compile(r"(?<![0-9])(?:[0-9]{2})?[0-9]{6}[-+]?[0-9]{4}(?![0-9])")


class Result(str, Enum):
    OK = "OK"
    INFO = "INFO"
    ERROR = "ERROR"


class ErrorId(str, Enum):
    """RIV-TA: everything but TECHNICAL_ERROR means "do not resend"."""

    VALIDATION_ERROR = "VALIDATION_ERROR"
    APPLICATION_ERROR = "APPLICATION_ERROR"
    REVOKED = "REVOKED"
    TECHNICAL_ERROR = "TECHNICAL_ERROR"


class Code(str, Enum):
    ALREADY_EXISTS = "ALREADY_EXISTS"
    ALREADY_REVOKED = "ALREADY_REVOKED"
    ALREADY_SENT = "ALREADY_SENT"
    NO_CHANGE = "NO_CHANGE"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    INVALID_PERSONNUMMER = "INVALID_PERSONNUMMER"
    UNKNOWN_CERTIFICATE_TYPE = "UNKNOWN_CERTIFICATE_TYPE"
    CONFLICT = "CONFLICT"
    TEST_CERTIFICATE = "TEST_CERTIFICATE"
    NOT_FOUND = "NOT_FOUND"
    NO_CONSENT = "NO_CONSENT"
    PURGED = "PURGED"
    UNKNOWN_RECIPIENT = "UNKNOWN_RECIPIENT"
    RECIPIENT_REJECTS_TYPE = "RECIPIENT_REJECTS_TYPE"
    FORBIDDEN = "FORBIDDEN"
    REVOKED = "REVOKED"
    UNAVAILABLE = "UNAVAILABLE"


INFO_CODES = frozenset({Code.ALREADY_EXISTS, Code.ALREADY_REVOKED, Code.ALREADY_SENT, Code.NO_CHANGE})

ERROR_IDS: dict[Code, ErrorId] = {
    Code.INVALID_MESSAGE: ErrorId.VALIDATION_ERROR,
    Code.INVALID_PERSONNUMMER: ErrorId.VALIDATION_ERROR,
    Code.UNKNOWN_CERTIFICATE_TYPE: ErrorId.VALIDATION_ERROR,
    Code.CONFLICT: ErrorId.VALIDATION_ERROR,
    Code.TEST_CERTIFICATE: ErrorId.VALIDATION_ERROR,
    Code.NOT_FOUND: ErrorId.APPLICATION_ERROR,
    Code.NO_CONSENT: ErrorId.APPLICATION_ERROR,
    Code.PURGED: ErrorId.APPLICATION_ERROR,
    Code.UNKNOWN_RECIPIENT: ErrorId.APPLICATION_ERROR,
    Code.RECIPIENT_REJECTS_TYPE: ErrorId.APPLICATION_ERROR,
    Code.FORBIDDEN: ErrorId.APPLICATION_ERROR,
    Code.REVOKED: ErrorId.REVOKED,
    Code.UNAVAILABLE: ErrorId.TECHNICAL_ERROR,
}


# What each code means to the sender (§3), published with the contract (`intygstjanst asyncapi`).
MEANINGS: dict[Code, str] = {
    Code.ALREADY_EXISTS: "register: the same id with the same patient and content is already stored",
    Code.ALREADY_REVOKED: "revoke of a certificate that is already revoked",
    Code.ALREADY_SENT: "send to a recipient the certificate was already sent to",
    Code.NO_CHANGE: "nothing to do: archive an archived one, restore an available one, consent already in that "
                    "state, care copy already removed",
    Code.INVALID_MESSAGE: "not JSON, wrong shape, unknown field, missing message_id, unknown routing key; the "
                          "message names the fields. The message is dead-lettered",
    Code.INVALID_PERSONNUMMER: "the patient id is not a valid personnummer or samordningsnummer",
    Code.UNKNOWN_CERTIFICATE_TYPE: "the certificate type is not in the configured type list",
    Code.CONFLICT: "register: the id exists with another patient or other content",
    Code.TEST_CERTIFICATE: "send of a test certificate",
    Code.NOT_FOUND: "no such certificate, or not visible to this caller (which of the two is never revealed)",
    Code.NO_CONSENT: "a citizen operation while the patient has not given consent",
    Code.PURGED: "register of an id that was purged: a purged certificate never comes back",
    Code.UNKNOWN_RECIPIENT: "the recipient is not configured or not active",
    Code.RECIPIENT_REJECTS_TYPE: "the recipient does not take this certificate type",
    Code.FORBIDDEN: "the publishing broker user's role may not send this message type",
    Code.REVOKED: "send of a revoked certificate",
    Code.UNAVAILABLE: "retries on a transient fault are exhausted; the message is in the dead-letter queue and "
                      "may be resent later",
}


class Reply(Strict):
    result: Result
    error_id: ErrorId | None = None
    code: Code | None = None
    message: str
    request_id: str
    data: dict[str, Any] | None = None

    @field_validator("message")
    @classmethod
    def _no_personnummer(cls, message: str) -> str:
        """§3: the message never contains a personnummer, whatever a handler put into it."""
        return _PERSONNUMMER_LIKE.sub("[personnummer]", message)

    @classmethod
    def ok(cls, request_id: str, message: str = "OK", data: dict[str, Any] | None = None) -> Reply:
        return cls(result=Result.OK, message=message, request_id=request_id, data=data)

    @classmethod
    def for_code(cls, code: Code, request_id: str, message: str, data: dict[str, Any] | None = None) -> Reply:
        """An INFO or ERROR reply; the error id follows from the code (one table, §3)."""
        if code in INFO_CODES:
            return cls(result=Result.INFO, code=code, message=message, request_id=request_id, data=data)
        return cls(result=Result.ERROR, error_id=ERROR_IDS[code], code=code, message=message,
                   request_id=request_id, data=data)
