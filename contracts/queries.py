"""Queries (CONTRACT.md §6); each needs `reply_to`."""
from __future__ import annotations

import datetime as dt
from typing import ClassVar

from pydantic import Field

from contracts.base import CertificateId, CertificateType, HsaId, PatientId, Strict

PageSize = Field(default=100, ge=1, le=1000)
PageToken = Field(default=None, max_length=512)


class GetCertificate(Strict):
    MESSAGE_TYPE: ClassVar[str] = "certificate.get"
    certificate_id: CertificateId
    patient_id: PatientId


class ListCertificates(Strict):
    MESSAGE_TYPE: ClassVar[str] = "certificate.list"
    patient_id: PatientId
    archived: bool = False
    types: list[CertificateType] = Field(default_factory=list, max_length=100)
    signed_from: dt.date | None = None
    signed_to: dt.date | None = None
    page_size: int = PageSize
    page_token: str | None = PageToken


class GetCertificateForCare(Strict):
    MESSAGE_TYPE: ClassVar[str] = "certificate.get-for-care"
    certificate_id: CertificateId
    care_giver_id: HsaId


class ListCertificatesForCare(Strict):
    MESSAGE_TYPE: ClassVar[str] = "certificate.list-for-care"
    patient_id: PatientId
    care_giver_id: HsaId
    care_unit_ids: list[HsaId] = Field(min_length=1, max_length=1000)
    page_size: int = PageSize
    page_token: str | None = PageToken


class GetConsent(Strict):
    MESSAGE_TYPE: ClassVar[str] = "consent.get"
    patient_id: PatientId


class ListRecipients(Strict):
    MESSAGE_TYPE: ClassVar[str] = "recipient.list"
    certificate_type: CertificateType | None = None
