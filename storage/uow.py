"""`domain.ports.UnitOfWork` on PostgreSQL: one connection, one transaction.

Leaving the `with` block rolls back whatever was not committed, so a handler that raises (or forgets to commit)
changes nothing. After `commit()` the unit of work may go on: the next statement starts a new transaction.
`savepoint()` lets the message loop handle a batch of messages in one transaction (one commit, one fsync) and
still undo just the message that failed.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, text

from storage.certificates import SqlCertificates
from storage.consents import SqlConsents
from storage.inbox import SqlInbox
from storage.outbox import SqlOutbox
from storage.progress import SqlProgress

PATIENT_LOCK_NAMESPACE = 1  # advisory lock namespaces: 1 = patients, 2 = outbox relay, 3 = migrations


class SqlUnitOfWork:
    certificates: SqlCertificates
    consents: SqlConsents
    inbox: SqlInbox
    outbox: SqlOutbox
    progress: SqlProgress

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None

    def __enter__(self) -> SqlUnitOfWork:
        self._conn = conn = self._engine.connect()
        self.certificates = SqlCertificates(conn)
        self.consents = SqlConsents(conn)
        self.inbox = SqlInbox(conn)
        self.outbox = SqlOutbox(conn)
        self.progress = SqlProgress(conn)
        return self

    def __exit__(self, *exc_info: object) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.rollback()  # nothing to undo after commit(); the connection may be broken if a fault got here
        finally:
            conn.close()

    @property
    def connection(self) -> Connection:
        """For the few statements the repositories do not cover; part of this unit's transaction."""
        if self._conn is None:
            raise RuntimeError("the unit of work is not open (use it in a with block)")
        return self._conn

    def commit(self) -> None:
        self.connection.commit()

    def rollback(self) -> None:
        self.connection.rollback()
        self.certificates.forget()

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
        nested = self.connection.begin_nested()
        try:
            yield
        except BaseException:
            if nested.is_active:
                nested.rollback()
            self.certificates.forget()
            raise
        else:
            if nested.is_active:
                nested.commit()
