"""Business refusals. Their codes are the contract's reply codes, spelled the same."""
from __future__ import annotations


class Refused(Exception):
    """The request is answered with an error and changes nothing."""

    def __init__(self, code: str, message: str, *, retry_until_found: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # A revoke may overtake its register: only an id never seen (nor purged) is worth waiting for.
        self.retry_until_found = retry_until_found


def not_found() -> Refused:
    # One text for "missing" and "not yours": the caller must not learn which.
    return Refused("NOT_FOUND", "no such certificate for this caller")


def no_consent() -> Refused:
    return Refused("NO_CONSENT", "the patient has not given consent")
