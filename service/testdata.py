"""Made-up but valid identities and messages for the demo, the benchmarks, the tests (`tests/factories.py`
re-exports the wire fixtures below) and the examples of the published contract (`intygstjanst asyncapi`).

- `certificate_json(**overrides)`: a valid CONTRACT §4 `Certificate` (wire JSON), top-level fields replaced.
- `wire_example(model, **overrides)`: a valid body of any contract model, built from these fixtures.
"""
from __future__ import annotations

import copy
import datetime as dt
import enum
import random
import types
import typing
from typing import Any

from pydantic import AwareDatetime, BaseModel

PATIENT = "191212121212"
CARE_GIVER = "SE2321000016-1000"
CARE_UNIT = "SE2321000016-1004"
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


def _example_values() -> dict[str, Any]:
    """Field name -> the fixture value a message of the contract carries in that field."""
    certificate = certificate_json()
    issuer = certificate["issued_by"]
    return {
        "certificate": certificate,
        "certificate_id": certificate["id"],
        "certificate_type": certificate["type"],
        "patient_id": PATIENT,
        "care_giver_id": CARE_GIVER,
        "care_unit_id": CARE_UNIT,
        "care_unit_ids": [CARE_UNIT],
        "person_id": issuer["person_id"],
        "name": issuer["name"],
        "person_name": issuer["name"],
        "recipient_id": "FKASSA",
        "event_id": "5b0d6c1e-3f7a-4d4e-9a51-2f6c0e8b7d21",
        "request_id": "care-system-4711",
        "test_certificate": certificate["test_certificate"],
    }


EXAMPLE_VALUES: dict[str, Any] = _example_values()


def wire_example(model: type[BaseModel], **overrides: Any) -> dict[str, Any]:
    """A valid body of `model` (wire JSON, defaults included) from the fixtures: each required field takes, in
    this order, its value in `overrides`, the first of the field's own `examples`, the first choice of a Literal
    or Enum, `EXAMPLE_VALUES` by field name, an example of its nested model, or the fixture time or date. A field
    none of these fits is an error naming it, so a new message cannot go without an example."""
    values = {name: overrides[name] if name in overrides else _field_example(model, name, field.annotation,
                                                                              field.examples)
              for name, field in model.model_fields.items() if name in overrides or field.is_required()}
    return model.model_validate(values).model_dump(mode="json", by_alias=True)


def _field_example(model: type[BaseModel], name: str, annotation: Any, examples: list[Any] | None) -> Any:
    if examples:
        return examples[0]
    annotation = _without_none(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return next(iter(annotation)).value
    if name in EXAMPLE_VALUES:
        return copy.deepcopy(EXAMPLE_VALUES[name])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return wire_example(annotation)
    if annotation in (dt.datetime, AwareDatetime):
        return SIGNED_AT.isoformat()
    if annotation is dt.date:
        return SIGNED_AT.date().isoformat()
    if annotation is bool:
        return True
    raise LookupError(f"no example for {model.__name__}.{name}: give the field `examples=[...]` or add its name "
                      f"to service.testdata.EXAMPLE_VALUES")


def _without_none(annotation: Any) -> Any:
    """`X | None` -> `X`; an Annotated type -> its base type."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            annotation = options[0]
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def personnummer(born: dt.date, serial: int) -> str:
    """`YYYYMMDD` + three-digit serial (001-999; 000 is never issued) + the Luhn check digit over the last ten."""
    if not 1 <= serial <= 999:
        raise ValueError("a personnummer serial is 001-999")
    digits = f"{born:%Y%m%d}{serial:03d}"
    total = 0
    for i, d in enumerate(digits[2:]):
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return digits + str((10 - total % 10) % 10)


def random_personnummer(rng: random.Random | None = None) -> str:
    rng = rng or random.Random()
    return personnummer(dt.date(1930, 1, 1) + dt.timedelta(days=rng.randrange(80 * 365)), rng.randrange(1, 1000))
