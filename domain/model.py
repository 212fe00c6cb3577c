"""A stored certificate with its two availability flags, a patient's consent, and recipients.

The seed (slide 11): each certificate is *available to care* (the care giver's copy) and *available to the
citizen*. The citizen's copy lives as long as the certificate; consent decides whether the citizen may reach it
and whether a certificate without a care copy may stay at all (`must_purge`).
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

from domain import canonical

# Death certificates are for authorities, never shown to the citizen (CONTRACT.md §4).
HIDDEN_FROM_CITIZEN = frozenset({"db", "doi"})
# What a citizen files away is the citizen's business: care never sees these statuses.
CITIZEN_ONLY_STATUSES = frozenset({"ARCHIVED", "RESTORED"})


@dataclass(frozen=True)
class StatusChange:
    status: str
    target: str | None
    at: dt.datetime


@dataclass
class Certificate:
    """The aggregate: every change to one certificate goes through its methods, which record events."""

    id: str
    type: str
    patient_id: str
    care_giver_id: str
    care_unit_id: str
    signed_at: dt.datetime
    test_certificate: bool
    # Identity of the content (`fingerprint()`), computed only when the same id is registered again
    # (`content_fingerprint`): None until then (since migration 0005 a new certificate is stored without one).
    fingerprint: str | None
    content: dict[str, Any]  # the registered certificate as JSON, opaque to the rules, without its document
    document: dict[str, Any] | None = None  # loaded only where it is returned or delivered
    available_to_care: bool = True
    archived: bool = False
    revoked_at: dt.datetime | None = None
    statuses: list[StatusChange] = field(default_factory=list)
    events: list[Any] = field(default_factory=list, repr=False, compare=False)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def sent_to(self) -> list[str]:
        return [s.target for s in self.statuses if s.status == "SENT" and s.target]

    def content_fingerprint(self) -> str:
        """The fingerprint of its content and document, computed once when needed (the document must be loaded
        then). Almost every registration is of a new id, which needs none: it cost about a tenth of a
        registration's CPU (canonical JSON of the 20 KB document and its SHA-256)."""
        if self.fingerprint is None:
            if self.document is None:
                raise ValueError(f"certificate {self.id}: no fingerprint stored and its document is not loaded")
            self.fingerprint = fingerprint({**self.content, "document": self.document})
        return self.fingerprint

    def pull_events(self) -> list[Any]:
        """The events recorded since the last pull, handed over once. A certificate must not keep them: an event
        such as Registered refers back to its certificate, and that cycle would leave the certificate (its 20 KB
        document included) to the cycle collector instead of freeing it once the message is handled."""
        events, self.events = self.events, []
        return events

    def record(self, status: str, at: dt.datetime, target: str | None = None) -> None:
        self.statuses.append(StatusChange(status, target, at))

    def visible_to_citizen(self, consent: Consent) -> bool:
        return consent.given and consent.patient_id == self.patient_id and self.type not in HIDDEN_FROM_CITIZEN

    def visible_to_care(self, care_giver_id: str) -> bool:
        return self.available_to_care and self.care_giver_id == care_giver_id

    def statuses_for_care(self) -> list[StatusChange]:
        return [s for s in self.statuses if s.status not in CITIZEN_ONLY_STATUSES]


@dataclass
class Consent:
    patient_id: str
    given: bool = False  # no record = not given
    changed_at: dt.datetime | None = None


@dataclass(frozen=True)
class Recipient:
    id: str
    name: str
    certificate_types: frozenset[str]
    trusted: bool = True
    active: bool = True


@dataclass(frozen=True)
class Catalogue:
    """The configured certificate types and recipients."""

    certificate_types: frozenset[str]
    recipients: dict[str, Recipient]


def must_purge(certificate: Certificate, consent: Consent) -> bool:
    """Slides 8 and 10: without a care copy and without consent a certificate has no reason to exist.
    A death certificate has no citizen's copy at all (never shown to the citizen), so without its care copy it
    is nobody's and goes too, consent or not."""
    if certificate.available_to_care:
        return False
    return not consent.given or certificate.type in HIDDEN_FROM_CITIZEN


def fingerprint(certificate_json: dict[str, Any]) -> str:
    """Identity of a registered certificate's whole content: the same id with another fingerprint is a CONFLICT.
    The SHA-256 of `json.dumps(certificate_json, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` in
    UTF-8, computed by `domain.canonical` (same bytes, several times faster for a large document)."""
    return hashlib.sha256(canonical.dumps_utf8(certificate_json)).hexdigest()
