"""Wake the outbox relay across processes: every commit that writes to the outbox also sends
`NOTIFY intyg_outbox` (storage.outbox.NOTIFY_CHANNEL), and a relay that runs apart from the consumers
(`serve --relay-only`) listens for it, so its replies leave within milliseconds instead of at the next poll."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy import Engine

from storage.engine import KEEPALIVE
from storage.outbox import NOTIFY_CHANNEL


class OutboxListener(threading.Thread):
    """LISTENs on its own connection and calls `wake` for each notification (PostgreSQL folds the notifications
    of one transaction into one). Reconnects with back-off; the relay's polling covers any gap."""

    def __init__(self, engine: Engine, wake: Callable[[], None], log: Any, *, backoff_max_s: float = 30.0) -> None:
        super().__init__(name="outbox-listener", daemon=True)
        # The dialect's own translation of the URL: a multi-host URL becomes libpq's host=h1,h2 port=p1,p2.
        self._connect_args = engine.dialect.create_connect_args(engine.url)[1]
        self._wake, self._log, self._backoff_max_s = wake, log, backoff_max_s
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        backoff = 0.5
        while not self._stopped.is_set():
            try:
                # keepalives: a partition must not leave it waiting on a dead socket for hours
                with psycopg.connect(autocommit=True, **{**KEEPALIVE, **self._connect_args}) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff = 0.5
                    while not self._stopped.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            self._wake()
            except psycopg.Error as exc:
                self._log.warning("outbox listener lost its database connection, will reconnect",
                                  error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                  retry_in_s=backoff)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, self._backoff_max_s)
