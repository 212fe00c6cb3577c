"""Field types shared by every message of the contract (CONTRACT.md §4)."""
from __future__ import annotations

import datetime as dt
import re
from typing import Annotated

from personnummer import personnummer
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, StringConstraints

_PATIENT_ID = re.compile(r"([0-9]{8})-?([0-9]{4})")  # ASCII digits only: `\d` takes any script's


class Strict(BaseModel):
    """Every message rejects unknown fields: a typo must not silently become a default."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


def _patient_id(value: str) -> str:
    """Accept `YYYYMMDDNNNN` or `YYYYMMDD-NNNN`; check date (day+60 for samordningsnummer) and Luhn digit."""
    match = _PATIENT_ID.fullmatch(value)
    if not match or not personnummer.valid(value):
        # The value itself is never echoed: it may be a personnummer with a typo.
        raise ValueError("not a valid personnummer or samordningsnummer")
    return match.group(1) + match.group(2)


PatientId = Annotated[str, StringConstraints(max_length=13), AfterValidator(_patient_id)]
HsaId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^\S+$")]
CertificateId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
CertificateType = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^\S+$")]
RecipientId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
Name = Annotated[str, StringConstraints(max_length=256)]
def _storable(value: dt.datetime) -> dt.datetime:
    """An instant the store can hold and read back: in UTC between the years 1 and 9999 (an offset may carry
    `0001-01-01T00:00:00+14:00` to the year 0, which PostgreSQL would store and Python could not load again)."""
    try:
        value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("the instant is outside the years 1 to 9999 in UTC") from None
    return value


Timestamp = Annotated[AwareDatetime, AfterValidator(_storable)]
