"""The access log in the handlers (CONTRACT §9): each care message records, in its own unit of work, one entry per
certificate it touched (what counts as touched: `domain.access`), and queues each new entry once in the outbox for
the national log service's queue `intyg.access-log`. In the unit of work of the reply: no answer without its entry.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from contracts.access import AccessedBy
from contracts.events import AccessLogged
from contracts.topology import ACCESS_LOGGED, EVENTS_EXCHANGE
from consumers.context import Context
from domain import access
from domain.access import Access, Reader
from domain.errors import Refused
from domain.model import Certificate
from domain.ports import UnitOfWork
from storage.outbox import OutboxMessage

# Event ids derive from the entry's key, so the one publication of an entry always carries the same id.
_EVENT_IDS = uuid.UUID("5d0c8a53-2f4e-4c55-9a55-1c0e6b0a7f11")


def reader(accessed_by: AccessedBy | None) -> Reader:
    if accessed_by is None:  # a v1 client, accepted only while ACCESS_LOG_REQUIRED is off
        return Reader()
    return Reader(accessed_by.person_id, accessed_by.name, accessed_by.care_unit_id)


def record(uow: UnitOfWork, ctx: Context, action: str, certificates: Iterable[Certificate],
           accessed_by: AccessedBy | None) -> None:
    entries = access.accesses(ctx.request_id, action, certificates, reader(accessed_by), ctx.now)
    # A redelivered message (a query is not in the inbox) finds its entries stored: neither stored nor published
    # again.
    uow.access_log.add(entries, [_published(entry, ctx) for entry in entries])


@contextmanager
def recorded(uow: UnitOfWork, ctx: Context, action: str, certificate: Certificate | None,
             accessed_by: AccessedBy | None) -> Iterator[None]:
    """Around a command's rule: the access to `certificate` (None: nothing to log) is recorded whatever the answer,
    refusals included, unless the answer reveals nothing of it (`domain.access.touched`)."""
    try:
        yield
    except Refused as refusal:
        if certificate is not None and access.touched(refusal):
            record(uow, ctx, action, [certificate], accessed_by)
        raise
    if certificate is not None:
        record(uow, ctx, action, [certificate], accessed_by)


def wire_entry(entry: Access) -> dict[str, Any]:
    return {"at": entry.at.isoformat(), "action": entry.action, "certificate_id": entry.certificate_id,
            "certificate_type": entry.certificate_type, "patient_id": entry.patient_id,
            "person_id": entry.person_id, "person_name": entry.person_name, "care_unit_id": entry.care_unit_id,
            "care_giver_id": entry.care_giver_id}


def _published(entry: Access, ctx: Context) -> OutboxMessage:
    event_id = str(uuid.uuid5(_EVENT_IDS, f"{entry.message_id}\n{entry.certificate_id}"))
    event = AccessLogged(event_id=event_id, type=ACCESS_LOGGED, occurred_at=ctx.now, **wire_entry(entry))
    return OutboxMessage(kind="event", exchange=EVENTS_EXCHANGE, routing_key=ACCESS_LOGGED, message_id=event_id,
                         body=event.model_dump_json().encode())
