"""Commands sent to the service (CONTRACT.md §5); the routing key is `MESSAGE_TYPE`."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from contracts.access import ACCESSED_BY, AccessedBy, require_accessed_by
from contracts.base import CertificateId, HsaId, Name, PatientId, RecipientId, Strict
from contracts.certificate import Certificate


class RegisterCertificate(Strict):
    """Care registers a signed certificate: stored, available to care and to the citizen, status RECEIVED. Event
    `certificate.registered`.
    """

    MESSAGE_TYPE: ClassVar[str] = "certificate.register"
    certificate: Certificate


class RevokedBy(Strict):
    person_id: HsaId
    name: Name


class RevokeCertificate(Strict):
    """Care revokes a certificate (status REVOKED). A revoke that overtakes its register waits for it (5 minutes
    by default), then NOT_FOUND. Events `certificate.revoked` and `recipient.R.certificate.revoked` for every
    recipient it was sent to.
    """

    MESSAGE_TYPE: ClassVar[str] = "certificate.revoke"
    certificate_id: CertificateId
    patient_id: PatientId
    revoked_by: RevokedBy
    reason: str | None = Field(default=None, max_length=2000)
    accessed_by: AccessedBy | None = ACCESSED_BY
    _accessed_by = field_validator("accessed_by")(require_accessed_by)


class RemoveCareCopy(Strict):
    """Care removes its copy. With the patient's consent the certificate stays the citizen's (`data.outcome`
    CITIZEN_ONLY, event `certificate.care-copy-removed`); without it, it is purged (`data.outcome` PURGED,
    event `certificate.purged`).
    """

    MESSAGE_TYPE: ClassVar[str] = "certificate.remove-care-copy"
    certificate_id: CertificateId
    care_giver_id: HsaId
    accessed_by: AccessedBy | None = ACCESSED_BY
    _accessed_by = field_validator("accessed_by")(require_accessed_by)


class RemoveCareCopies(Strict):
    """A care giver leaves: the rule of `certificate.remove-care-copy` for each of its certificates, in batches;
    `data = {"citizen_only": n, "purged": m}`.
    """

    MESSAGE_TYPE: ClassVar[str] = "care-giver.remove-care-copies"
    care_giver_id: HsaId
    accessed_by: AccessedBy | None = ACCESSED_BY
    _accessed_by = field_validator("accessed_by")(require_accessed_by)


class SetStatus(Strict):
    """The citizen archives a certificate (out of view, still available to care) or restores it; needs consent.
    Event `certificate.archived` / `certificate.restored`.
    """

    MESSAGE_TYPE: ClassVar[str] = "certificate.set-status"
    certificate_id: CertificateId
    patient_id: PatientId
    status: Literal["ARCHIVED", "RESTORED"]


class SendCertificate(Strict):
    """The citizen (needs consent) or care (its own certificate, with `care_giver_id`) sends a certificate to a
    recipient: status SENT, event `certificate.sent`, and `recipient.R.certificate.sent` with the whole
    certificate to the recipient's queue.
    """

    MESSAGE_TYPE: ClassVar[str] = "certificate.send"
    certificate_id: CertificateId
    patient_id: PatientId
    recipient_id: RecipientId
    sent_by: Literal["CITIZEN", "CARE"]
    care_giver_id: HsaId | None = None
    accessed_by: AccessedBy | None = ACCESSED_BY  # only with sent_by CARE
    _accessed_by = field_validator("accessed_by")(require_accessed_by)


class SetConsent(Strict):
    """The citizen gives or withdraws consent. Withdrawing purges every certificate of the patient no longer
    available to care; `data = {"purged": n}`, event `certificate.purged` for each.
    """

    MESSAGE_TYPE: ClassVar[str] = "consent.set"
    patient_id: PatientId
    given: bool
