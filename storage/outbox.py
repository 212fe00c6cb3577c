"""The transactional outbox: replies and events are written in the transaction that made the change, and a relay
publishes them afterwards (CONTRACT §8: change, events and reply are atomic; published at least once).

Order: ids are a sequence, so rows are published in the order they were written. Two changes to one certificate
are serialised by its row lock, so the later change's rows always get higher ids and are committed after the
earlier ones: publishing in id order keeps each certificate's events in order, provided that only one relay
publishes at a time (`try_lead`) and that it stops at the first row it fails to publish instead of skipping it.

The relay functions take a plain Connection and leave committing to the caller.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Connection, Integer, any_, bindparam, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY

from storage.tables import outbox
from storage.writes import insert_rows

RELAY_LOCK = (2, 1)  # advisory lock namespace 2 (1 = patients, 3 = migrations)
MAX_ERROR_LENGTH = 2000


@dataclass(frozen=True)
class OutboxMessage:
    kind: str  # 'reply' (default exchange, routing key = reply_to) or 'event'
    exchange: str
    routing_key: str
    message_id: str
    body: bytes
    correlation_id: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass(frozen=True, kw_only=True)
class OutboxRow(OutboxMessage):
    id: int
    attempts: int = 0


NOTIFY_CHANNEL = "intyg_outbox"


class SqlOutbox:
    def __init__(self, connection: Connection) -> None:
        self._conn = connection
        self.added = False  # since the last commit or rollback

    def add(self, messages: Sequence[OutboxMessage]) -> None:
        """Queued with the unit of work's other writes (`storage.writes`) and inserted in the order added, across
        every message of the batch: ids in that order."""
        self.added = self.added or bool(messages)
        insert_rows(self._conn, outbox, [
            {"kind": m.kind, "exchange": m.exchange, "routing_key": m.routing_key, "message_id": m.message_id,
             "correlation_id": m.correlation_id, "content_type": m.content_type, "headers": dict(m.headers),
             "body": m.body}
            for m in messages])


def notify(conn: Connection) -> None:
    """Tell a listening relay (publishers.wakeup) that rows are coming; delivered when the transaction commits."""
    conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})


def try_lead(conn: Connection) -> bool:
    """Become the one publishing relay, without waiting. The lock belongs to the database session, not the
    transaction: keep this connection checked out for as long as you lead, and give it up with `release_lead`
    (or by closing the connection; a crashed leader's lock goes with its session). A session that already leads
    and calls again stacks the lock: call `release_lead` as often as `try_lead` returned True."""
    return bool(conn.execute(text("SELECT pg_try_advisory_lock(:a, :b)"),
                             {"a": RELAY_LOCK[0], "b": RELAY_LOCK[1]}).scalar_one())


def release_lead(conn: Connection) -> bool:
    return bool(conn.execute(text("SELECT pg_advisory_unlock(:a, :b)"),
                             {"a": RELAY_LOCK[0], "b": RELAY_LOCK[1]}).scalar_one())


# The relay's statements, built once (building and caching a select costs more than PostgreSQL needs to run it).
_OLDEST_UNPUBLISHED = (
    select(outbox.c.id, outbox.c.attempts, outbox.c.kind, outbox.c.exchange, outbox.c.routing_key,
           outbox.c.message_id, outbox.c.body, outbox.c.correlation_id, outbox.c.headers, outbox.c.content_type,
           (func.sum(func.octet_length(outbox.c.body)).over(order_by=outbox.c.id)
            - func.octet_length(outbox.c.body)).label("bytes_before"))
    .where(outbox.c.published_at.is_(None)).order_by(outbox.c.id)
    .limit(bindparam("limit", type_=Integer))
    .subquery())
# A batch stops at `max_bytes` of bodies (the first row always comes): 500 recipient deliveries of 4 MiB each
# must not all be in memory at once.
_UNPUBLISHED = (select(*[c for c in _OLDEST_UNPUBLISHED.c if c.name != "bytes_before"])
                .where(_OLDEST_UNPUBLISHED.c.bytes_before < bindparam("max_bytes", type_=BigInteger))
                .order_by(_OLDEST_UNPUBLISHED.c.id))
_MARK_PUBLISHED = (update(outbox)
                   .where(outbox.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))),
                          outbox.c.published_at.is_(None))
                   .values(published_at=func.now()))


_new_row = object.__new__


def _outbox_row(id: int, attempts: int, kind: str, exchange: str, routing_key: str, message_id: str, body: Any,
                correlation_id: str | None, headers: Any, content_type: str) -> OutboxRow:
    """`OutboxRow(...)` without the frozen dataclass's `__init__` (a `object.__setattr__` per field): the relay
    makes one per published message."""
    row = _new_row(OutboxRow)
    row.__dict__.update(kind=kind, exchange=exchange, routing_key=routing_key, message_id=message_id,
                        body=body if type(body) is bytes else bytes(body), correlation_id=correlation_id,
                        headers=headers or {}, content_type=content_type, id=id, attempts=attempts)
    return row


def unpublished(conn: Connection, limit: int, max_bytes: int = 64 * 1024 * 1024) -> list[OutboxRow]:
    """The oldest unpublished rows, in publication (id) order: at most `limit` rows, and no more rows once their
    bodies add up to `max_bytes` (but always the first)."""
    rows = conn.execute(_UNPUBLISHED, {"limit": limit, "max_bytes": max_bytes}).all()
    return [_outbox_row(*r) for r in rows]


def mark_published(conn: Connection, ids: Sequence[int]) -> int:
    if not ids:
        return 0
    return conn.execute(_MARK_PUBLISHED, {"ids": list(ids)}).rowcount


def mark_failed(conn: Connection, id: int, error: str) -> None:
    """Count a failed attempt. The relay should then stop this round rather than publish later rows, or one
    certificate's events could overtake each other."""
    conn.execute(update(outbox).where(outbox.c.id == id)
                 .values(attempts=outbox.c.attempts + 1, last_error=error[:MAX_ERROR_LENGTH]))


def delete_published_before(conn: Connection, cutoff: dt.datetime, limit: int = 10_000) -> int:
    """Housekeeping: published rows older than `cutoff` have done their job. Deletes at most `limit` of them,
    oldest first, so that a day of traffic goes in short statements (call again while it returns `limit`)."""
    oldest = select(outbox.c.id).where(outbox.c.published_at < cutoff).order_by(outbox.c.id).limit(limit)
    return conn.execute(delete(outbox).where(outbox.c.id.in_(oldest.scalar_subquery()))).rowcount


def pending_count(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))).scalar_one()
