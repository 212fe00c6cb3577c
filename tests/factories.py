"""Valid test data to start from; tests override what they are about.

- `certificate_json(**overrides)`: a valid CONTRACT §4 `Certificate` (wire JSON), top-level fields replaced.
- `certificate(**fields)`: a `domain.model.Certificate` as storage holds it (content consistent with its columns),
  with a fresh id unless one is given; `statuses` may be `StatusChange`s or `(status, target, at)` tuples.
- `personnummer(born, serial)`: a valid 12-digit personnummer (Luhn check digit computed).

Fixed numbers (check digits verified with the `personnummer` package): 191212121212, 199001012385,
201701102384; samordningsnummer 191212721219 (day 12 + 60).
"""
from __future__ import annotations

import copy
import datetime as dt
import uuid
from typing import Any

from domain.model import Certificate, StatusChange, fingerprint
from service.testdata import personnummer  # noqa: F401  (re-exported: the tests make their patients with it)

PATIENT = PATIENT_ID = "191212121212"
OTHER_PATIENT = "199001012385"
THIRD_PATIENT = "201701102384"
SAMORDNINGSNUMMER = "191212721219"
CARE_GIVER = CARE_GIVER_ID = "SE2321000016-1000"
OTHER_CARE_GIVER = "SE2321000016-2000"
CARE_UNIT = CARE_UNIT_ID = "SE2321000016-1004"
SIGNED_AT = dt.datetime(2026, 11, 25, 8, 30, tzinfo=dt.timezone.utc)

DOCUMENT: dict[str, Any] = {"media_type": "application/xml", "encoding": "utf-8", "content": "<intyg>Åsa 🩺</intyg>"}


def issued_by(care_giver_id: str = CARE_GIVER, care_unit_id: str = CARE_UNIT) -> dict[str, Any]:
    return {"person_id": "SE2321000016-1003", "name": "Ajla Doktor",
            "care_unit": {"id": care_unit_id, "name": "Vårdenhet 1"},
            "care_giver": {"id": care_giver_id, "name": "Vårdgivare 1"}}


_CERTIFICATE: dict[str, Any] = {
    "id": "9f02dd2f-f57c-4c23-b4d0-3a7a6a1b9c11",
    "type": "lisjp",
    "type_version": "1.3",
    "patient_id": PATIENT,
    "signed_at": "2026-11-25T09:30:00+01:00",
    "valid_from": "2026-11-25",
    "valid_to": "2026-12-24",
    "issued_by": issued_by(),
    "test_certificate": False,
    "relations": [],
    "document": DOCUMENT,
}


def certificate_json(**overrides: Any) -> dict[str, Any]:
    """A valid CONTRACT §4 `Certificate`; top-level fields replaced by `overrides`."""
    certificate = copy.deepcopy(_CERTIFICATE)
    certificate.update(copy.deepcopy(overrides))
    return certificate


def certificate(*, id: str | None = None, type: str = "lisjp", patient_id: str = PATIENT,
                care_giver_id: str = CARE_GIVER, care_unit_id: str = CARE_UNIT, signed_at: dt.datetime = SIGNED_AT,
                test_certificate: bool = False, available_to_care: bool = True, archived: bool = False,
                revoked_at: dt.datetime | None = None, statuses: Any = (), document: dict[str, Any] | None = None,
                **content: Any) -> Certificate:
    """A stored certificate; other keyword arguments (type_version, valid_from, ...) go into its content."""
    wire = certificate_json(id=id or f"cert-{uuid.uuid4()}", type=type, patient_id=patient_id,
                            signed_at=signed_at.isoformat(), issued_by=issued_by(care_giver_id, care_unit_id),
                            test_certificate=test_certificate, **content)
    wire.pop("document")
    document = copy.deepcopy(document if document is not None else DOCUMENT)
    return Certificate(
        id=wire["id"], type=type, patient_id=patient_id, care_giver_id=care_giver_id, care_unit_id=care_unit_id,
        signed_at=signed_at, test_certificate=test_certificate,
        fingerprint=fingerprint({**wire, "document": document}), content=wire, document=document,
        available_to_care=available_to_care, archived=archived, revoked_at=revoked_at,
        statuses=[s if isinstance(s, StatusChange) else StatusChange(*s) for s in statuses],
    )
