"""Commands sent to the service (CONTRACT.md §5); the routing key is `MESSAGE_TYPE`."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from contracts.base import CertificateId, HsaId, Name, PatientId, RecipientId, Strict
from contracts.certificate import Certificate


class RegisterCertificate(Strict):
    MESSAGE_TYPE: ClassVar[str] = "certificate.register"
    certificate: Certificate


class RevokedBy(Strict):
    person_id: HsaId
    name: Name


class RevokeCertificate(Strict):
    MESSAGE_TYPE: ClassVar[str] = "certificate.revoke"
    certificate_id: CertificateId
    patient_id: PatientId
    revoked_by: RevokedBy
    reason: str | None = Field(default=None, max_length=2000)


class RemoveCareCopy(Strict):
    MESSAGE_TYPE: ClassVar[str] = "certificate.remove-care-copy"
    certificate_id: CertificateId
    care_giver_id: HsaId


class RemoveCareCopies(Strict):
    MESSAGE_TYPE: ClassVar[str] = "care-giver.remove-care-copies"
    care_giver_id: HsaId


class SetStatus(Strict):
    MESSAGE_TYPE: ClassVar[str] = "certificate.set-status"
    certificate_id: CertificateId
    patient_id: PatientId
    status: Literal["ARCHIVED", "RESTORED"]


class SendCertificate(Strict):
    MESSAGE_TYPE: ClassVar[str] = "certificate.send"
    certificate_id: CertificateId
    patient_id: PatientId
    recipient_id: RecipientId
    sent_by: Literal["CITIZEN", "CARE"]
    care_giver_id: HsaId | None = None


class SetConsent(Strict):
    MESSAGE_TYPE: ClassVar[str] = "consent.set"
    patient_id: PatientId
    given: bool
