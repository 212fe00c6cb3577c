"""The transactional outbox: events are written in the transaction that made the change, and a relay publishes
them afterwards (CONTRACT §8: change, events and reply are atomic; published at least once). Replies no longer
come this way (the inbox keeps a command's reply, and the message loop publishes it after the commit); the relay
still publishes reply rows that a service older than issue 10 wrote, so an upgrade in place loses none.

Order: ids are a sequence, and two changes to one certificate are serialised by its row lock, so a certificate's
later rows always get higher ids. Each event row carries its certificate id as `ordering_key`; a batch takes at
most one unpublished row per key, the lowest id, so a certificate's next event is only fetched once the one
before it is confirmed and marked (a nacked row is tried again before anything after it). Replies have no key:
they never wait for each other.

A row that fails is tried again after a back-off (`retry_at`); after `max_attempts` it is parked (`parked_at`):
skipped, and holding up only the later rows of its own key, until an operator unparks it.

Leadership fence: every statement of the relay acts only if its own database session holds the relay's advisory
lock (`_LEADS`, evaluated inside the statement). A statement that runs on any other session (a new pooled
connection, say) reads and changes nothing and raises `NotLeading`.

The relay functions take a plain Connection and leave committing to the caller.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Row, Text, any_, bindparam, func, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY

from storage.tables import outbox, tombstones
from storage.writes import BufferedConnection, insert_rows

RELAY_LOCK = (2, 1)  # advisory lock namespace 2 (1 = patients, 3 = migrations)
MAX_ERROR_LENGTH = 2000
NOTIFY_CHANNEL = "intyg_outbox"

# True when the session running the statement holds the relay lock. pg_locks lists a two-key advisory lock as
# classid = key 1, objid = key 2, objsubid = 2; a backend belongs to one database, so its pid is enough.
_LEADS = (f"EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = {RELAY_LOCK[0]} "
          f"AND objid = {RELAY_LOCK[1]} AND objsubid = 2 AND granted AND pid = pg_backend_pid())")


class NotLeading(RuntimeError):
    """The session that ran a relay statement does not hold the relay lock: it must not publish."""


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
    ordering_key: str | None = None  # the certificate an event is about: its rows leave one at a time, in order
    erase_when_published: bool = False  # carries personal data: deleted, not kept, once published


@dataclass(frozen=True, kw_only=True)
class OutboxRow(OutboxMessage):
    id: int
    attempts: int = 0


@dataclass(frozen=True)
class Parked:
    id: int
    routing_key: str
    message_id: str
    attempts: int
    error: str


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
             "body": m.body, "ordering_key": m.ordering_key, "erase_when_published": m.erase_when_published}
            for m in messages])


def notify(conn: BufferedConnection) -> None:
    """Tell a listening relay (publishers.wakeup) that rows are coming; delivered when the transaction commits.
    Queued on the unit of work's `BufferedConnection` behind its inserts: it costs no round trip of its own."""
    conn.defer_statement("SELECT pg_notify(%(channel)s, '')", {"channel": NOTIFY_CHANNEL})


def erase_purged(conn: Connection, certificate_ids: Sequence[str]) -> None:
    """CONTRACT §8 Purge: of a purged certificate nothing but its id remains. Its published rows go now; its
    unpublished ones (deliveries decided before the purge, the purge's own events) go as soon as they are
    published. Only ids with a tombstone count, so a purge undone by a savepoint rollback erases nothing. Run it
    after this transaction's outbox rows are written (the unit of work does, at commit)."""
    purged = (select(tombstones.c.certificate_id)
              .where(tombstones.c.certificate_id == any_(bindparam("ids", type_=ARRAY(Text)))))
    of_purged = outbox.c.ordering_key.in_(purged.scalar_subquery())
    conn.execute(update(outbox).where(of_purged, outbox.c.published_at.is_(None))
                 .values(erase_when_published=True), {"ids": list(certificate_ids)})
    conn.execute(outbox.delete().where(of_purged, outbox.c.published_at.is_not(None)),
                 {"ids": list(certificate_ids)})


# --- leadership ---------------------------------------------------------------------------------------------------
def try_lead(conn: Connection) -> bool:
    """Become the one publishing relay, without waiting. The lock belongs to the database session, not the
    transaction: keep this connection for as long as you lead, and give it up with `release_lead` (or by closing
    the session; a crashed leader's lock goes with its session)."""
    return bool(conn.execute(text("SELECT pg_try_advisory_lock(:a, :b)"),
                             {"a": RELAY_LOCK[0], "b": RELAY_LOCK[1]}).scalar_one())


def release_lead(conn: Connection) -> bool:
    return bool(conn.execute(text("SELECT pg_advisory_unlock(:a, :b)"),
                             {"a": RELAY_LOCK[0], "b": RELAY_LOCK[1]}).scalar_one())


def leads(conn: Connection) -> bool:
    """Does this connection's session hold the relay lock right now?"""
    return bool(conn.execute(text(f"SELECT {_LEADS}")).scalar_one())


# --- the relay's statements ---------------------------------------------------------------------------------------
# A batch: the oldest rows that are due, at most one per ordering key (the lowest unpublished id of the key), and no
# more rows once their bodies add up to `max_bytes` (always the first): 500 recipient deliveries of 4 MiB each must
# not all be in memory at once. The scan is bounded: it looks at the oldest `window` rows that are not held up
# behind a parked row or one waiting out its back-off (`ix_outbox_failed`, a handful of rows), and takes each key's
# first among them; the oldest of those is always a key's head, so the relay never stalls.
_UNPUBLISHED = text(f"""
    WITH candidates AS (
        SELECT o.id, o.ordering_key, o.body FROM outbox o
        WHERE o.published_at IS NULL AND o.parked_at IS NULL AND (o.retry_at IS NULL OR o.retry_at <= now())
          AND (o.ordering_key IS NULL OR NOT EXISTS (
                   SELECT 1 FROM outbox f
                   WHERE f.ordering_key = o.ordering_key AND f.id < o.id AND f.published_at IS NULL
                     AND f.retry_at IS NOT NULL AND (f.parked_at IS NOT NULL OR f.retry_at > now())))
          AND {_LEADS}
        ORDER BY o.id LIMIT :window),
    heads AS (
        SELECT id, body, ordering_key IS NULL
                         OR row_number() OVER (PARTITION BY ordering_key ORDER BY id) = 1 AS head
        FROM candidates),
    batch AS (
        SELECT id, sum(octet_length(body)) OVER (ORDER BY id) - octet_length(body) AS bytes_before
        FROM heads WHERE head ORDER BY id LIMIT :limit)
    SELECT o.id, o.attempts, o.kind, o.exchange, o.routing_key, o.message_id, o.body, o.correlation_id, o.headers,
           o.content_type
    FROM batch JOIN outbox o ON o.id = batch.id
    WHERE batch.bytes_before < :max_bytes
    ORDER BY o.id""")

# Confirmed rows: erased if they carry personal data, else marked published (with a note, say 'unroutable reply').
_MARK_PUBLISHED = text(f"""
    WITH fence AS (SELECT {_LEADS} AS held),
    settled AS (SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:notes AS text[])) AS s(id, note)),
    erased AS (DELETE FROM outbox o USING settled s, fence
               WHERE fence.held AND o.id = s.id AND o.published_at IS NULL AND o.erase_when_published
               RETURNING o.id),
    marked AS (UPDATE outbox o SET published_at = now(), retry_at = NULL, last_error = coalesce(s.note, o.last_error)
               FROM settled s, fence
               WHERE fence.held AND o.id = s.id AND o.published_at IS NULL AND NOT o.erase_when_published
               RETURNING o.id)
    SELECT (SELECT held FROM fence), (SELECT count(*) FROM erased) + (SELECT count(*) FROM marked)""")

# Failed rows: one more attempt, back-off `min(retry_base_s * 2^(attempts-1), retry_max_s)`, parked at the last.
_MARK_FAILED = text(f"""
    WITH fence AS (SELECT {_LEADS} AS held),
    failures AS (SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[])) AS f(id, error)),
    failed AS (UPDATE outbox o
               SET attempts = o.attempts + 1, last_error = left(f.error, {MAX_ERROR_LENGTH}),
                   retry_at = now() + least(:retry_base_s * 2 ^ o.attempts, :retry_max_s) * interval '1 second',
                   parked_at = CASE WHEN o.attempts + 1 >= :max_attempts THEN now() END
               FROM failures f, fence
               WHERE fence.held AND o.id = f.id AND o.published_at IS NULL
               RETURNING o.id, o.routing_key, o.message_id, o.attempts, o.last_error, o.parked_at IS NOT NULL AS parked)
    SELECT fence.held, failed.* FROM fence LEFT JOIN failed ON true""")


def unpublished(conn: Connection, limit: int, max_bytes: int = 64 * 1024 * 1024) -> list[OutboxRow]:
    """The next batch, in publication (id) order. Raises `NotLeading` if this session does not hold the lock."""
    rows = conn.execute(_UNPUBLISHED, {"limit": limit, "window": max(10 * limit, 1000),
                                       "max_bytes": max_bytes}).all()
    if not rows and not leads(conn):  # an empty batch says nothing about the lock: ask
        raise NotLeading("the relay's session does not hold the relay lock")
    return [_outbox_row(*r) for r in rows]


def mark_published(conn: Connection, ids: Sequence[int], notes: Mapping[int, str] | None = None) -> int:
    """Confirmed: erase the rows that carry personal data, mark the others published. Returns how many."""
    if not ids:
        return 0
    notes = notes or {}
    held, count = conn.execute(_MARK_PUBLISHED, {"ids": list(ids), "notes": [notes.get(i) for i in ids]}).one()
    if not held:
        raise NotLeading("the relay's session lost the relay lock before it could mark what it published")
    return count


def mark_failed(conn: Connection, failures: Mapping[int, str], *, max_attempts: int, retry_base_s: float = 0.5,
                retry_max_s: float = 30.0) -> list[Parked]:
    """Count a failed attempt of each row (id -> error) and delay its next one. Returns the rows this parked."""
    if not failures:
        return []
    result = conn.execute(_MARK_FAILED, {
        "ids": list(failures), "errors": list(failures.values()), "max_attempts": max_attempts,
        "retry_base_s": retry_base_s, "retry_max_s": retry_max_s}).all()
    if not result[0].held:
        raise NotLeading("the relay's session lost the relay lock before it could count a failed attempt")
    return [Parked(r.id, r.routing_key, r.message_id, r.attempts, r.last_error) for r in result if r.parked]


_new_row = object.__new__


def _outbox_row(id: int, attempts: int, kind: str, exchange: str, routing_key: str, message_id: str, body: Any,
                correlation_id: str | None, headers: Any, content_type: str) -> OutboxRow:
    """`OutboxRow(...)` without the frozen dataclass's `__init__` (a `object.__setattr__` per field): the relay
    makes one per published message."""
    row = _new_row(OutboxRow)
    row.__dict__.update(kind=kind, exchange=exchange, routing_key=routing_key, message_id=message_id,
                        body=body if type(body) is bytes else bytes(body), correlation_id=correlation_id,
                        headers=headers or {}, content_type=content_type, id=id, attempts=attempts,
                        ordering_key=None, erase_when_published=False)
    return row


# --- for operators ------------------------------------------------------------------------------------------------
def pending_count(conn: Connection) -> int:
    """Unpublished rows, parked ones included."""
    return conn.execute(select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))).scalar_one()


def retrying(conn: Connection) -> bool:
    """Is a row to be tried again after a failed attempt (due now or soon, unlike a parked one)?"""
    return conn.execute(select(outbox.c.id).where(outbox.c.published_at.is_(None), outbox.c.parked_at.is_(None),
                                                  outbox.c.retry_at.is_not(None)).limit(1)).first() is not None


def parked_rows(conn: Connection, limit: int = 100) -> list[Row]:
    return list(conn.execute(
        select(outbox.c.id, outbox.c.routing_key, outbox.c.message_id, outbox.c.ordering_key, outbox.c.attempts,
               outbox.c.last_error, outbox.c.created_at, outbox.c.parked_at)
        .where(outbox.c.parked_at.is_not(None), outbox.c.published_at.is_(None)).order_by(outbox.c.id).limit(limit)))


def parked_count(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(outbox)
                        .where(outbox.c.parked_at.is_not(None), outbox.c.published_at.is_(None))).scalar_one()


def unpark(conn: Connection, ids: Sequence[int] | None) -> int:
    """Give parked rows (the given ids, or all with None) a fresh set of attempts, due at once."""
    statement = update(outbox).where(outbox.c.parked_at.is_not(None), outbox.c.published_at.is_(None))
    if ids is not None:
        statement = statement.where(outbox.c.id.in_(list(ids)))
    return conn.execute(statement.values(parked_at=None, attempts=0, retry_at=None)).rowcount
