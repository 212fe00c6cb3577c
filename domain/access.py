"""What a care message accessed (CONTRACT.md §9, Patientdatalagen 4 kap. 3 §): one entry per certificate touched.

A certificate is touched when the answer is about it. Every answer but NOT_FOUND tells the reader something of
the certificate (its content, that it is revoked, already sent, a test, of a type the recipient refuses), so it
is logged; NOT_FOUND, the same for "missing" and "not yours", reveals nothing and is not.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from domain.errors import Refused
from domain.model import Certificate

READ, LIST, REVOKE, REMOVE_CARE_COPY, SEND = "READ", "LIST", "REVOKE", "REMOVE_CARE_COPY", "SEND"


@dataclass(frozen=True)
class Reader:
    """Who in care reads. All None only for a v1 client while the log is not required: the access is still
    logged, with the care giver it was made for."""

    person_id: str | None = None
    name: str | None = None
    care_unit_id: str | None = None


@dataclass(frozen=True)
class Access:
    """One log entry: ids only, never content, so it may outlive the certificate it documents. `message_id` and
    `certificate_id` are its key: a message redelivered or sent again logs nothing twice."""

    message_id: str
    at: dt.datetime
    action: str
    certificate_id: str
    certificate_type: str
    patient_id: str
    care_giver_id: str
    person_id: str | None
    person_name: str | None
    care_unit_id: str | None


def touched(refusal: Refused | None) -> bool:
    return refusal is None or refusal.code != "NOT_FOUND"


def accesses(message_id: str, action: str, certificates: Iterable[Certificate], reader: Reader,
             at: dt.datetime) -> list[Access]:
    return [Access(message_id, at, action, c.id, c.type, c.patient_id, c.care_giver_id, reader.person_id,
                   reader.name, reader.care_unit_id) for c in certificates]
