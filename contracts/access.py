"""The access log of care staff's reads (CONTRACT.md §9): who reads, what an entry says, and the rule that a care
message names its reader while `ACCESS_LOG_REQUIRED` is on."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, ValidationInfo
from pydantic_core import PydanticCustomError

from contracts.base import CertificateId, CertificateType, HsaId, PatientId, Strict, Timestamp

# Validation context key: the service passes its setting (`ACCESS_LOG_REQUIRED`, on by default) with every message it
# parses; a model validated without it (an example, a client's own check) does not demand the field.
ACCESS_LOG_REQUIRED = "access_log_required"

Action = Literal["READ", "LIST", "REVOKE", "REMOVE_CARE_COPY", "SEND"]


class AccessedBy(Strict):
    """The person in care who reads, and the unit they work for."""

    person_id: HsaId
    name: Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"\S")]
    care_unit_id: HsaId


# Declared last in each care message, so that its check sees the fields before it (`sent_by`).
ACCESSED_BY: Any = Field(default=None, validate_default=True)


def require_accessed_by(value: AccessedBy | None, info: ValidationInfo) -> AccessedBy | None:
    """§9: a care message without `accessed_by` is invalid while the log is required; a citizen's send names no
    one from care, so it must not carry one."""
    if info.data.get("sent_by") == "CITIZEN":
        if value is not None:
            raise PydanticCustomError("extra_forbidden", "only a send by CARE names who accessed it")
        return value
    if value is None and (info.context or {}).get(ACCESS_LOG_REQUIRED, False):
        raise PydanticCustomError("missing", "Field required")
    return value


class AccessEntry(Strict):
    """One certificate touched by one care message. Ids only, never content. The person fields are null only for
    a v1 client while `ACCESS_LOG_REQUIRED` is off."""

    at: Timestamp
    action: Action
    certificate_id: CertificateId
    certificate_type: CertificateType
    patient_id: PatientId
    person_id: HsaId | None
    person_name: str | None
    care_unit_id: HsaId | None
    care_giver_id: HsaId
