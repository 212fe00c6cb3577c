"""One place that decides how the service talks to PostgreSQL.

Operators hand us the plain `postgresql://` (or Heroku-style `postgres://`) URL; SQLAlchemy would pick psycopg2
for it, which we do not ship, so the dialect is forced to psycopg 3 here.

Timeouts are set as libpq start-up options, so they cost no round trip: a lock that is not granted within
`lock_timeout` and a statement running longer than `statement_timeout` become errors (`storage.errors` calls
them transient) instead of a consumer that hangs forever with a message unacknowledged. The session time zone is
UTC so that timestamps come back the same whatever the server's default.
"""
from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

_SCHEMES = {"postgres", "postgresql"}


def to_sqlalchemy_url(database_url: str | URL) -> URL:
    """`postgres[ql][+driver]://...` -> `postgresql+psycopg://...`, anything else is a configuration error."""
    url = make_url(database_url)
    backend = url.drivername.split("+", 1)[0]
    if backend not in _SCHEMES:
        raise ValueError(f"not a PostgreSQL URL (scheme {url.drivername!r})")
    return url.set(drivername="postgresql+psycopg")


def _options(url: URL, settings: dict[str, str]) -> str:
    # A URL may already carry `?options=...` (e.g. a search_path); ours are appended, not replacing it.
    given = url.query.get("options", "")
    if isinstance(given, tuple):
        given = " ".join(given)
    ours = " ".join(f"-c {name}={value}" for name, value in settings.items())
    return f"{given} {ours}".strip()


def make_engine(database_url: str | URL, *, pool_size: int = 5, max_overflow: int = 5,
                lock_timeout_ms: int = 5_000, statement_timeout_ms: int = 30_000,
                idle_in_transaction_timeout_ms: int = 60_000, application_name: str = "intygstjanst",
                ping_after_idle_s: float = 1.0, **engine_kwargs: Any) -> Engine:
    """An engine for the service. A timeout of 0 means none (migrations want no statement timeout).

    A connection that sat in the pool for `ping_after_idle_s` or longer is pinged before it is handed out (and
    replaced if dead), because the consumers sit idle for long stretches and a restarted database must not cost
    the first message after it a retry. One used a moment ago is not: SQLAlchemy's `pool_pre_ping` would ping on
    every checkout, a round trip per batch on the busy path. LIFO keeps the busiest connection in use (its
    prepared statements stay warm) and lets the others go idle. `pool_recycle` keeps connections from outliving
    firewalls' idle cuts. `idle_in_transaction_session_timeout` frees row and advisory locks of a process that
    hung mid-transaction.
    """
    url = to_sqlalchemy_url(database_url)
    settings = {
        "lock_timeout": str(lock_timeout_ms),
        "statement_timeout": str(statement_timeout_ms),
        "idle_in_transaction_session_timeout": str(idle_in_transaction_timeout_ms),
        "timezone": "UTC",
    }
    options = _options(url, settings)
    url = url.difference_update_query(["options"])
    connect_args = {"options": options, "application_name": application_name, "connect_timeout": 10}
    connect_args.update(engine_kwargs.pop("connect_args", {}))
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_use_lifo=True,
        pool_recycle=1800,
        pool_timeout=10,
        connect_args=connect_args,
        **engine_kwargs,
    )
    _ping_when_idle(engine, ping_after_idle_s)
    return engine


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """SQLAlchemy's documented pessimistic disconnect handling, limited to connections that sat idle: raising
    `DisconnectionError` in `checkout` makes the pool discard the connection and hand out a fresh one."""

    @event.listens_for(engine, "handle_error")
    def _server_gone(context: Any) -> None:
        # The server says it is going away (shutdown, crash, cannot connect): SQLAlchemy's psycopg dialect only
        # counts a connection psycopg already saw closed as a disconnect, so this one could go back to the pool
        # and, used again within `idle_s`, unpinged, cost the next batch a retry. Invalidate it now.
        state = getattr(context.original_exception, "sqlstate", None)
        if state is not None and (state.startswith("08") or state in ("57P01", "57P02", "57P03")):
            context.is_disconnect = True

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < idle_s:
            return  # just connected, or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # noqa: BLE001 - any failure: a new connection
            raise sa_exc.DisconnectionError("pooled connection is dead") from exc
