"""Bounded tables (CONTRACT §8): what has served its time is deleted, in short batches that never wait for a row
lock held by the hot path (`FOR UPDATE SKIP LOCKED`; a row in use is taken next round).

- inbox: entries older than the deduplication window (`DEDUP_WINDOW`): the `message_id` rule holds that long.
- bulk_progress: a care giver's leaving is finished once its message id is in the inbox (the handler writes the
  inbox row with the final reply, in the transaction of the last batch); an unfinished one older than the window
  was abandoned (dead-lettered midway and never replayed).
- outbox: published rows older than `OUTBOX_RETENTION` (rows with personal data are never kept: the relay
  erases them when they are confirmed).
- access_log: entries older than `ACCESS_LOG_RETENTION` (CONTRACT §9; they outlive the certificate, not this).

`Housekeeper` runs the rounds in a thread of its own, apart from the relay's I/O loop (a long round must not hold
up replies). Every instance that runs a relay runs one; a transaction-level advisory lock makes them take turns,
so one instance deletes at a time and a crashed one holds nothing.
"""
from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, text

HOUSEKEEPING_LOCK = (2, 2)  # advisory lock namespace 2 (the outbox relay's), key 2
BATCH = 1000  # rows per statement: a few milliseconds each

_DELETES = {
    "inbox": text("""
        DELETE FROM inbox WHERE message_id IN (
            SELECT message_id FROM inbox WHERE handled_at < now() - :dedup_window
            ORDER BY handled_at LIMIT :batch FOR UPDATE SKIP LOCKED)"""),
    # before the inbox rows that tell it is finished are gone
    "bulk_progress": text("""
        DELETE FROM bulk_progress WHERE message_id IN (
            SELECT p.message_id FROM bulk_progress p
            WHERE EXISTS (SELECT 1 FROM inbox i WHERE i.message_id = p.message_id)
               OR p.updated_at < now() - :dedup_window
            LIMIT :batch FOR UPDATE SKIP LOCKED)"""),
    "outbox": text("""
        DELETE FROM outbox WHERE id IN (
            SELECT id FROM outbox WHERE published_at < now() - :outbox_retention
            ORDER BY published_at LIMIT :batch FOR UPDATE SKIP LOCKED)"""),
    "access_log": text("""
        DELETE FROM access_log WHERE (message_id, certificate_id) IN (
            SELECT message_id, certificate_id FROM access_log WHERE at < now() - :access_log_retention
            ORDER BY at LIMIT :batch FOR UPDATE SKIP LOCKED)"""),
}
_ORDER = ("bulk_progress", "inbox", "outbox", "access_log")


@dataclass(frozen=True)
class Retention:
    dedup_window: dt.timedelta = dt.timedelta(days=7)
    outbox_retention: dt.timedelta = dt.timedelta(hours=24)
    access_log_retention: dt.timedelta = dt.timedelta(days=3653)  # 10 years, leap days included


def delete_batch(conn: Connection, table: str, retention: Retention, batch: int = BATCH) -> int | None:
    """One short transaction: delete at most `batch` expired rows of `table` and commit. None when another
    instance is housekeeping right now."""
    with conn.begin():
        if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:a, :b)"),
                            {"a": HOUSEKEEPING_LOCK[0], "b": HOUSEKEEPING_LOCK[1]}).scalar_one():
            return None
        return conn.execute(_DELETES[table], {"dedup_window": retention.dedup_window,
                                               "outbox_retention": retention.outbox_retention,
                                               "access_log_retention": retention.access_log_retention,
                                               "batch": batch}).rowcount


def sweep(engine: Engine, retention: Retention, batch: int = BATCH,
          stop: threading.Event | None = None) -> dict[str, int]:
    """One round: every table until nothing expired is left (or another instance holds the turn, or `stop`).
    Returns the rows deleted per table."""
    deleted = dict.fromkeys(_ORDER, 0)
    with engine.connect() as conn:
        for table in _ORDER:
            while stop is None or not stop.is_set():
                count = delete_batch(conn, table, retention, batch)
                if count is None:
                    return deleted
                deleted[table] += count
                if count < batch:
                    break
    return deleted


class Housekeeper(threading.Thread):
    """A `sweep` every `interval_s` seconds until `stop()`, with a log line per round that says what it removed.
    A database fault only skips the round."""

    def __init__(self, engine: Engine, retention: Retention, log: Any, *, interval_s: float = 60.0) -> None:
        super().__init__(name="housekeeping", daemon=True)
        self.engine, self.retention, self.log, self.interval_s = engine, retention, log, interval_s
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                deleted = sweep(self.engine, self.retention, stop=self._stopped)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                self.log.warning("housekeeping round failed", error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            self.log.info("housekeeping round", **{f"deleted_{table}": n for table, n in deleted.items()})
