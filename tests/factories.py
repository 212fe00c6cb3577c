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
# The wire fixtures live beside the generator of the published contract's examples (docs/asyncapi.yaml), so that
# those examples are these very values; re-exported here because the tests build their messages from them.
from service.testdata import (  # noqa: F401
    CARE_GIVER,
    CARE_UNIT,
    DOCUMENT,
    PATIENT,
    SIGNED_AT,
    certificate_json,
    issued_by,
    personnummer,
)

PATIENT_ID = PATIENT
OTHER_PATIENT = "199001012385"
THIRD_PATIENT = "201701102384"
SAMORDNINGSNUMMER = "191212721219"
CARE_GIVER_ID = CARE_GIVER
OTHER_CARE_GIVER = "SE2321000016-2000"
CARE_UNIT_ID = CARE_UNIT
# CONTRACT §9: who in care accesses; every care message in the tests carries it.
ACCESSED_BY: dict[str, str] = {"person_id": "SE2321000016-1003", "name": "Ajla Doktor", "care_unit_id": CARE_UNIT}


def certificate(*, id: str | None = None, type: str = "lisjp", patient_id: str = PATIENT,
                care_giver_id: str = CARE_GIVER, care_unit_id: str = CARE_UNIT, signed_at: dt.datetime = SIGNED_AT,
                test_certificate: bool = False, available_to_care: bool = True, archived: bool = False,
                revoked_at: dt.datetime | None = None, statuses: Any = (), document: dict[str, Any] | None = None,
                fingerprinted: bool = True, **content: Any) -> Certificate:
    """A stored certificate; other keyword arguments (type_version, valid_from, ...) go into its content.
    `fingerprinted`: with its fingerprint computed, as versions before migration 0005 stored every one."""
    wire = certificate_json(id=id or f"cert-{uuid.uuid4()}", type=type, patient_id=patient_id,
                            signed_at=signed_at.isoformat(), issued_by=issued_by(care_giver_id, care_unit_id),
                            test_certificate=test_certificate, **content)
    wire.pop("document")
    document = copy.deepcopy(document if document is not None else DOCUMENT)
    return Certificate(
        id=wire["id"], type=type, patient_id=patient_id, care_giver_id=care_giver_id, care_unit_id=care_unit_id,
        signed_at=signed_at, test_certificate=test_certificate,
        fingerprint=fingerprint({**wire, "document": document}) if fingerprinted else None, content=wire,
        document=document,
        available_to_care=available_to_care, archived=archived, revoked_at=revoked_at,
        statuses=[s if isinstance(s, StatusChange) else StatusChange(*s) for s in statuses],
    )
