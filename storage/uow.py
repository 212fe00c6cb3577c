"""`domain.ports.UnitOfWork` on PostgreSQL: one connection, one transaction.

Leaving the `with` block rolls back whatever was not committed, so a handler that raises (or forgets to commit)
changes nothing. After `commit()` the unit of work may go on: the next statement starts a new transaction.
`savepoint()` lets the message loop handle a batch of messages in one transaction (one commit, one fsync) and
still undo just the message that failed.

Two things make a batch cheap (the message loop's hot path):
- Write buffering (`storage.writes`): new certificates, their documents and statuses, inbox and outbox rows are
  queued and inserted with one COPY or executemany per table, flushed before any other statement, at the end of a
  savepoint and at `commit()`.
- Warm-up: `warm(message_ids, certificate_ids)` learns in one query which of a batch's message ids are in the
  inbox and which certificate ids have a row or a tombstone; for the ones found absent, `inbox.get`,
  `certificates.get` and `certificates.is_purged` answer without a query (see their `known_absent`). It holds for
  one transaction (forgotten at commit and rollback).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, Text, any_, bindparam, literal, select, text, union_all
from sqlalchemy.dialects.postgresql import ARRAY

from storage.access_log import SqlAccessLog
from storage.certificates import SqlCertificates
from storage.consents import SqlConsents
from storage.inbox import SqlInbox
from storage import outbox as outbox_store
from storage.outbox import SqlOutbox
from storage.progress import SqlProgress
from storage.tables import certificates, inbox, tombstones
from storage.writes import BufferedConnection

PATIENT_LOCK_NAMESPACE = 1  # advisory lock namespaces: 1 = patients, 2 = outbox relay, 3 = migrations

_IN_INBOX, _CERTIFICATE, _TOMBSTONE = 1, 2, 3
_WARM = union_all(
    select(literal(_IN_INBOX), inbox.c.message_id)
    .where(inbox.c.message_id == any_(bindparam("message_ids", type_=ARRAY(Text)))),
    select(literal(_CERTIFICATE), certificates.c.id)
    .where(certificates.c.id == any_(bindparam("certificate_ids", type_=ARRAY(Text)))),
    select(literal(_TOMBSTONE), tombstones.c.certificate_id)
    .where(tombstones.c.certificate_id == any_(bindparam("certificate_ids", type_=ARRAY(Text)))),
)


class SqlUnitOfWork:
    certificates: SqlCertificates
    consents: SqlConsents
    inbox: SqlInbox
    outbox: SqlOutbox
    progress: SqlProgress
    access_log: SqlAccessLog

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: BufferedConnection | None = None

    def __enter__(self) -> SqlUnitOfWork:
        self._conn = conn = BufferedConnection(self._engine.connect())
        self.certificates = SqlCertificates(conn)  # type: ignore[arg-type]  # a Connection that buffers inserts
        self.consents = SqlConsents(conn)
        self.inbox = SqlInbox(conn)
        self.outbox = SqlOutbox(conn)
        self.progress = SqlProgress(conn)  # type: ignore[arg-type]
        self.access_log = SqlAccessLog(conn, self.outbox)  # type: ignore[arg-type]
        conn.after_flush(certificates, self.certificates._not_purged_since)
        return self

    def __exit__(self, *exc_info: object) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.discard()
        try:
            conn.rollback()  # nothing to undo after commit(); the connection may be broken if a fault got here
        finally:
            conn.close()

    @property
    def connection(self) -> Connection:
        """For the few statements the repositories do not cover; part of this unit's transaction (a
        `BufferedConnection`: queued inserts are flushed before each statement)."""
        if self._conn is None:
            raise RuntimeError("the unit of work is not open (use it in a with block)")
        return self._conn  # type: ignore[return-value]

    @property
    def flush_failed(self) -> bool:
        """A flush of queued inserts failed in this unit of work: the error may belong to an earlier message than
        the one whose statement triggered the flush."""
        return self._conn is not None and self._conn.flush_failed

    def flush(self) -> None:
        """Insert what is queued now (`commit()` and `savepoint()` do it themselves)."""
        self._buffered().flush()

    def warm(self, message_ids: Iterable[str | None], certificate_ids: Iterable[str | None]) -> None:
        """One query for a whole batch: which message ids are in the inbox, which certificate ids have a row or a
        tombstone. Until the transaction ends, reads of the ones found absent need no query."""
        mids = list(dict.fromkeys(m for m in message_ids if m))
        cids = list(dict.fromkeys(c for c in certificate_ids if c))
        if not mids and not cids:
            return
        found: dict[int, set[str]] = {_IN_INBOX: set(), _CERTIFICATE: set(), _TOMBSTONE: set()}
        for kind, key in self.connection.execute(_WARM, {"message_ids": mids, "certificate_ids": cids}):
            found[kind].add(key)
        self.inbox.known_absent(m for m in mids if m not in found[_IN_INBOX])
        self.certificates.known_absent((c for c in cids if c not in found[_CERTIFICATE]),
                                       (c for c in cids if c not in found[_TOMBSTONE]))

    def _forget_warm(self) -> None:
        self.inbox.forget()
        self.certificates.known_absent((), ())

    def commit(self) -> None:
        conn = self._buffered()
        if self.certificates.purged:  # after this transaction's own outbox rows are written (the next statement
            outbox_store.erase_purged(conn, sorted(self.certificates.purged))  # flushes them first)
            self.certificates.purged.clear()
        if self.outbox.added:
            outbox_store.notify(conn)
            self.outbox.added = False
        conn.flush()
        conn.commit()
        self._forget_warm()

    def rollback(self) -> None:
        conn = self._buffered()
        conn.discard()
        self.outbox.added = False
        conn.rollback()
        self.certificates.forget()
        self.certificates.purged.clear()
        self._forget_warm()

    def _buffered(self) -> BufferedConnection:
        if self._conn is None:
            raise RuntimeError("the unit of work is not open (use it in a with block)")
        return self._conn

    def lock_patient(self, patient_id: str) -> None:
        """Waits (at most `lock_timeout`) for any other transaction holding the patient, and holds it until
        commit or rollback. `hashtext` collisions only make two patients wait for each other, never wrong."""
        self.connection.execute(text("SELECT pg_advisory_xact_lock(:ns, hashtext(:pid))"),
                                {"ns": PATIENT_LOCK_NAMESPACE, "pid": patient_id})

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """SAVEPOINT; on an exception ROLLBACK TO it and re-raise, otherwise RELEASE it.

        Rolling back to it also releases the row and advisory locks taken inside. A transient fault is different:
        a lost connection takes the whole transaction, and after a deadlock the locks the earlier messages of the
        batch hold are what the other side waits for, so roll back and retry the whole batch."""
        conn = self._buffered()
        conn.flush()  # what came before belongs before the savepoint
        nested = conn.begin_nested()
        try:
            yield
            conn.flush()  # a failing insert fails inside the savepoint of the message that made it
        except BaseException:
            conn.discard()
            if nested.is_active:
                nested.rollback()
            self.certificates.forget()
            raise
        else:
            if nested.is_active:
                nested.commit()
