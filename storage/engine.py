"""One place that decides how the service talks to PostgreSQL.

Operators hand us the plain `postgresql://` (or Heroku-style `postgres://`) URL; SQLAlchemy would pick psycopg2
for it, which we do not ship, so the dialect is forced to psycopg 3 here.

Timeouts are set as libpq start-up options, so they cost no round trip: a lock that is not granted within
`lock_timeout` and a statement running longer than `statement_timeout` become errors (`storage.errors` calls
them transient) instead of a consumer that hangs forever with a message unacknowledged. The session time zone is
UTC so that timestamps come back the same whatever the server's default.

TCP keepalives on both ends (`KEEPALIVE`): after a network partition each side finds the other gone within about
half a minute (10 s idle, then 3 probes 5 s apart; `tcp_user_timeout` for data left unacknowledged), instead of the
kernel's two hours. On the server that ends a dead client's backend, and with it the locks it held, the relay's
leader lock above all; `client_connection_check_interval` (PostgreSQL 14+) also ends a query whose client left.
"""
from __future__ import annotations

import re
import time
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

_SCHEMES = {"postgres", "postgresql"}

# libpq's client side (seconds; tcp_user_timeout in ms) and the server's own, per session.
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
             "tcp_user_timeout": 30_000}
SERVER_KEEPALIVE = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3",
                    "tcp_user_timeout": "30000"}
CLIENT_CHECK_INTERVAL_MS = 5_000  # PostgreSQL 14+: unknown to older servers, so set after connecting


class SessionLost(RuntimeError):
    """A one-session engine was asked for a second database session."""


def to_sqlalchemy_url(database_url: str | URL) -> URL:
    """`postgres[ql][+driver]://...` -> `postgresql+psycopg://...`, anything else is a configuration error.
    libpq's multi-host form is accepted (see `_hosts_as_query`)."""
    url = make_url(_hosts_as_query(database_url) if isinstance(database_url, str) else database_url)
    backend = url.drivername.split("+", 1)[0]
    if backend not in _SCHEMES:
        raise ValueError(f"not a PostgreSQL URL (scheme {url.drivername!r})")
    return url.set(drivername="postgresql+psycopg")


_NETLOC = re.compile(r"^(?P<scheme>[^:/]+)://(?P<netloc>[^/?#]*)(?P<rest>.*)$", re.S)


def _hosts_as_query(database_url: str) -> str:
    """libpq's `postgresql://u@h1:5432,h2:5432/db?target_session_attrs=read-write` (which SQLAlchemy cannot parse:
    it reads `5432,h2:5432` as the port) -> SQLAlchemy's spelling of the same, one `host=h:port` query parameter
    per host, which its psycopg dialect hands to libpq as `host=h1,h2 port=5432,5432`. libpq then tries the hosts
    in order, skipping one that is down or, with `target_session_attrs=read-write`, a standby."""
    match = _NETLOC.match(database_url)
    if match is None:
        return database_url
    userinfo, at, hosts = match["netloc"].rpartition("@")
    if "," not in hosts:
        return database_url
    path, _, query = match["rest"].partition("?")
    listed = "&".join(f"host={host}" for host in hosts.split(",") if host)
    return f"{match['scheme']}://{userinfo}{at}{path or '/'}?{listed}" + (f"&{query}" if query else "")


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
        **SERVER_KEEPALIVE,
    }
    options = _options(url, settings)
    url = url.difference_update_query(["options"])
    connect_args = {"options": options, "application_name": application_name, "connect_timeout": 10, **KEEPALIVE}
    connect_args.update(engine_kwargs.pop("connect_args", {}))
    if engine_kwargs.get("poolclass") is not NullPool:
        engine_kwargs.update(pool_size=pool_size, max_overflow=max_overflow, pool_use_lifo=True, pool_recycle=1800,
                             pool_timeout=10)
    engine = create_engine(url, connect_args=connect_args, **engine_kwargs)
    _check_client_while_running(engine)
    _ping_when_idle(engine, ping_after_idle_s)
    return engine


def one_session(database_url: str | URL, **make_engine_kwargs: Any) -> Connection:
    """A connection that is one database session for its whole life, for a holder of a session-level lock.

    SQLAlchemy quietly gives a Connection whose session was lost a new one at its next statement (after a
    rollback); that session would hold none of the old one's locks. Here the engine behind the connection opens
    exactly one session: asked for another, it raises `SessionLost`. Closing the connection ends the session
    (no pool keeps it)."""
    engine = make_engine(database_url, poolclass=NullPool, **make_engine_kwargs)
    opened = False

    @event.listens_for(engine, "do_connect")
    def _only_once(*_args: Any) -> None:
        nonlocal opened
        if opened:
            raise SessionLost("this connection's database session is gone; a new one would not hold its locks")
        opened = True

    return engine.connect()


def _check_client_while_running(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connected(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection.info.server_version >= 140000:
            dbapi_connection.execute(f"SET client_connection_check_interval = {CLIENT_CHECK_INTERVAL_MS}")
            dbapi_connection.commit()  # a SET inside a transaction that is later rolled back would be undone


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
