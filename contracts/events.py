"""Events and recipient deliveries published on `intyg.events` (CONTRACT.md §7).

Broadcast events (`certificate.*`) carry no patient id and no document; recipient deliveries
(`recipient.R.certificate.*`) carry what the recipient needs.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from contracts.access import AccessEntry
from contracts.base import CertificateId, CertificateType, HsaId, PatientId, RecipientId, Strict, Timestamp
from contracts.certificate import Certificate


class Event(Strict):
    ROUTING_KEY: ClassVar[str]
    event_id: str
    type: str
    occurred_at: Timestamp


class CertificateRegistered(Event):
    """A certificate was registered."""

    ROUTING_KEY: ClassVar[str] = "certificate.registered"
    certificate_id: CertificateId
    certificate_type: CertificateType
    care_unit_id: HsaId
    care_giver_id: HsaId
    signed_at: Timestamp
    test_certificate: bool


class CertificateRevoked(Event):
    """A certificate was revoked."""

    ROUTING_KEY: ClassVar[str] = "certificate.revoked"
    certificate_id: CertificateId
    certificate_type: CertificateType
    care_giver_id: HsaId


class CertificateSent(Event):
    """A certificate was sent to a recipient."""

    ROUTING_KEY: ClassVar[str] = "certificate.sent"
    certificate_id: CertificateId
    certificate_type: CertificateType
    recipient_id: RecipientId
    sent_by: Literal["CITIZEN", "CARE"]


class CertificateArchived(Event):
    """The citizen archived a certificate."""

    ROUTING_KEY: ClassVar[str] = "certificate.archived"
    certificate_id: CertificateId


class CertificateRestored(Event):
    """The citizen restored an archived certificate."""

    ROUTING_KEY: ClassVar[str] = "certificate.restored"
    certificate_id: CertificateId


class CareCopyRemoved(Event):
    """Care removed its copy; the certificate is the citizen's only."""

    ROUTING_KEY: ClassVar[str] = "certificate.care-copy-removed"
    certificate_id: CertificateId
    care_giver_id: HsaId


class CertificatePurged(Event):
    """A certificate was purged for good; only its id is kept."""

    ROUTING_KEY: ClassVar[str] = "certificate.purged"
    certificate_id: CertificateId
    reason: Literal["CARE_COPY_REMOVED_WITHOUT_CONSENT", "CONSENT_WITHDRAWN"]


class RecipientCertificateSent(Event):
    """To recipient R: the certificate a citizen or care sent it, whole (document included); routing key
    `recipient.<R>.certificate.sent`. Never for a test certificate."""

    ROUTING_KEY: ClassVar[str] = "recipient.{recipient_id}.certificate.sent"
    recipient_id: RecipientId
    sent_by: Literal["CITIZEN", "CARE"]
    certificate: Certificate


class RecipientCertificateRevoked(Event):
    """To recipient R: a certificate it received was revoked; routing key `recipient.<R>.certificate.revoked`."""

    ROUTING_KEY: ClassVar[str] = "recipient.{recipient_id}.certificate.revoked"
    recipient_id: RecipientId
    certificate_id: CertificateId
    patient_id: PatientId
    reason: str | None = None


class AccessLogged(Event, AccessEntry):
    """§9: one access log entry, with the patient id, for the national log service's queue `intyg.access-log`
    only (never a broadcast: the routing key is outside `certificate.*`)."""

    ROUTING_KEY: ClassVar[str] = "access.logged"
