"""Queries (CONTRACT.md §6); each needs `reply_to`."""
from __future__ import annotations

import datetime as dt
from typing import ClassVar

from pydantic import Field, field_validator

from contracts.access import ACCESSED_BY, AccessedBy, require_accessed_by
from contracts.base import CertificateId, CertificateType, HsaId, PatientId, Strict

PageSize = Field(default=100, ge=1, le=1000)
PageToken = Field(default=None, max_length=512)


class GetCertificate(Strict):
    """The citizen reads one certificate, document included, archived ones too (needs consent); `data` =
    StoredCertificate.
    """

    MESSAGE_TYPE: ClassVar[str] = "certificate.get"
    certificate_id: CertificateId
    patient_id: PatientId


class ListCertificates(Strict):
    """The citizen lists certificates, newest `signed_at` first, without documents (needs consent); `archived:
    true` lists the archive; dates are Swedish calendar days, both inclusive. `data = {"certificates":
    [StoredCertificate], "next_page_token"}`.
    """

    MESSAGE_TYPE: ClassVar[str] = "certificate.list"
    patient_id: PatientId
    archived: bool = False
    types: list[CertificateType] = Field(default_factory=list, max_length=100)
    signed_from: dt.date | None = None
    signed_to: dt.date | None = None
    page_size: int = PageSize
    page_token: str | None = PageToken


class GetCertificateForCare(Strict):
    """Care reads one certificate of its own care giver while it is available to care; `data` =
    StoredCertificate.
    """

    MESSAGE_TYPE: ClassVar[str] = "certificate.get-for-care"
    certificate_id: CertificateId
    care_giver_id: HsaId
    accessed_by: AccessedBy | None = ACCESSED_BY
    _accessed_by = field_validator("accessed_by")(require_accessed_by)


class ListCertificatesForCare(Strict):
    """Care lists a patient's certificates available to care and issued by one of the given care units; `data =
    {"certificates": [StoredCertificate], "next_page_token"}`.
    """

    MESSAGE_TYPE: ClassVar[str] = "certificate.list-for-care"
    patient_id: PatientId
    care_giver_id: HsaId
    care_unit_ids: list[HsaId] = Field(min_length=1, max_length=1000)
    page_size: int = PageSize
    page_token: str | None = PageToken
    accessed_by: AccessedBy | None = ACCESSED_BY
    _accessed_by = field_validator("accessed_by")(require_accessed_by)


class GetConsent(Strict):
    """Whether the patient has given consent; `data = {"given": bool, "changed_at": time | null}`."""

    MESSAGE_TYPE: ClassVar[str] = "consent.get"
    patient_id: PatientId


class ListRecipients(Strict):
    """The configured recipients, optionally only those taking one certificate type; `data = {"recipients":
    [{"id", "name", "certificate_types", "trusted", "active"}]}`.
    """

    MESSAGE_TYPE: ClassVar[str] = "recipient.list"
    certificate_type: CertificateType | None = None


class ListAccessLog(Strict):
    """§9: the patient's own access log, for the citizen portal (consent plays no part)."""

    MESSAGE_TYPE: ClassVar[str] = "access-log.list"
    patient_id: PatientId
    from_: dt.date | None = Field(default=None, alias="from")
    to: dt.date | None = None
    page_size: int = PageSize
    page_token: str | None = PageToken
