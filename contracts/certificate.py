"""What care registers (`Certificate`) and what get/list return (`StoredCertificate`), CONTRACT.md §4."""
from __future__ import annotations

import base64
import binascii
import datetime as dt
from enum import Enum
from typing import Literal

from pydantic import Field, model_validator

from contracts.base import CertificateId, CertificateType, HsaId, Name, PatientId, RecipientId, Strict, Timestamp


class CareUnit(Strict):
    id: HsaId
    name: Name


class CareGiver(Strict):
    id: HsaId
    name: Name


class IssuedBy(Strict):
    person_id: HsaId
    name: Name
    care_unit: CareUnit
    care_giver: CareGiver


class RelationCode(str, Enum):
    ERSATT = "ERSATT"
    KOMPLT = "KOMPLT"
    FRLANG = "FRLANG"
    KOPIA = "KOPIA"


class Relation(Strict):
    code: RelationCode
    certificate_id: CertificateId


class Document(Strict):
    media_type: str = Field(min_length=1, max_length=255)
    encoding: Literal["utf-8", "base64"] = "utf-8"
    content: str

    @model_validator(mode="after")
    def _base64_decodes(self) -> Document:
        if self.encoding == "base64":
            try:
                base64.b64decode(self.content, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("document.content is not valid base64") from None
        return self


class Certificate(Strict):
    id: CertificateId
    type: CertificateType
    type_version: str = Field(min_length=1, max_length=32)
    patient_id: PatientId
    signed_at: Timestamp
    valid_from: dt.date | None = None
    valid_to: dt.date | None = None
    issued_by: IssuedBy
    test_certificate: bool = False
    relations: list[Relation] = Field(default_factory=list, max_length=100)
    document: Document

    @model_validator(mode="after")
    def _validity_in_order(self) -> Certificate:
        if self.valid_from and self.valid_to and self.valid_to < self.valid_from:
            raise ValueError("valid_to is before valid_from")
        return self


class Status(str, Enum):
    RECEIVED = "RECEIVED"
    SENT = "SENT"
    REVOKED = "REVOKED"
    ARCHIVED = "ARCHIVED"
    RESTORED = "RESTORED"
    CARE_COPY_REMOVED = "CARE_COPY_REMOVED"


class StatusEntry(Strict):
    status: Status
    target: str | None = None
    at: Timestamp


class StoredCertificate(Strict):
    """A stored certificate as a reader sees it; `archived`/`available_to_care` only for the citizen."""

    id: CertificateId
    type: CertificateType
    type_version: str
    patient_id: PatientId
    signed_at: Timestamp
    valid_from: dt.date | None = None
    valid_to: dt.date | None = None
    issued_by: IssuedBy
    test_certificate: bool
    relations: list[Relation]
    document: Document | None = None
    revoked: bool
    revoked_at: Timestamp | None = None
    sent_to: list[RecipientId]
    statuses: list[StatusEntry]
    archived: bool | None = None
    available_to_care: bool | None = None
