"""What happened to a certificate, in the order it happened. The consumers turn these into wire events."""
from __future__ import annotations

from dataclasses import dataclass

from domain.model import Certificate


@dataclass(frozen=True)
class Registered:
    certificate: Certificate


@dataclass(frozen=True)
class Revoked:
    certificate: Certificate
    reason: str | None
    sent_to: tuple[str, ...]  # every recipient that must hear of it


@dataclass(frozen=True)
class Sent:
    certificate: Certificate
    recipient_id: str
    sent_by: str


@dataclass(frozen=True)
class Archived:
    certificate_id: str


@dataclass(frozen=True)
class Restored:
    certificate_id: str


@dataclass(frozen=True)
class CareCopyRemoved:
    certificate_id: str
    care_giver_id: str


@dataclass(frozen=True)
class Purged:
    certificate_id: str
    reason: str  # CARE_COPY_REMOVED_WITHOUT_CONSENT or CONSENT_WITHDRAWN
