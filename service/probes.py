"""The service's HTTP port (`METRICS_PORT`, default 9464): `/metrics` for Prometheus, `/healthz` and `/readyz` for
an orchestrator. A small `http.server` in daemon threads, started before the service waits for its database and
broker, so that a probe can tell "starting" from "broken".

- `/healthz` (liveness): 200 while every thread the service started is alive; 503 names the dead ones. Restarting
  the process is the cure for what it reports, so it looks at nothing outside the process.
- `/readyz` (readiness): 200 when the database answers and is migrated to the code's head revision, every consumer
  of this process consumes, and some relay (this process's or another's) holds the outbox lock (`pg_locks`);
  503 otherwise. The JSON body names each check and what is wrong.

A port already in use is logged once; the service runs on without the endpoints.
"""
from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.metrics import registry_for
from storage import migrate
from storage.engine import make_engine
from storage.outbox import RELAY_LOCK

PROBE_TIMEOUT_MS = 2_000  # a probe must answer before the orchestrator's own timeout

# Advisory locks are per database: the relay lock of another database on the same server is another service's.
_LEADER = text("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = :a AND objid = :b "
               "AND objsubid = 2 AND granted "
               "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))")
_REVISION = text("SELECT version_num FROM alembic_version")
_HAS_VERSION_TABLE = text("SELECT to_regclass('alembic_version') IS NOT NULL")


class Probes:
    """Owns the registry, a small engine for the probes and the HTTP server of one `Service`."""

    def __init__(self, service: Any, port: int, host: str = "") -> None:
        self.service = service
        # a few connections: a scrape and two probes at once must not queue behind one that waits for a dead server
        self.engine = make_engine(service.settings.database_url, pool_size=1, max_overflow=2,
                                  statement_timeout_ms=PROBE_TIMEOUT_MS, lock_timeout_ms=PROBE_TIMEOUT_MS,
                                  application_name="intygstjanst-probes",
                                  connect_args={"connect_timeout": PROBE_TIMEOUT_MS // 1000})
        self.registry, self.loop_metrics = registry_for(service, self.engine)
        self.head = migrate.head()
        self.port = port
        self.host = host
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Listen; False (logged) when the port cannot be had."""
        try:
            self._server = _Server((self.host, self.port), _Handler, self)
        except OSError as exc:
            self.service.log.warning(f"metrics and health endpoints off: cannot listen on port {self.port} "
                                     f"({exc.strerror or exc}); the service runs on without them", port=self.port)
            return False
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="probes", daemon=True)
        self._thread.start()
        self.service.log.info("metrics and health endpoints listening", port=self.port,
                              paths=["/metrics", "/healthz", "/readyz"])
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.engine.dispose()

    # -- the checks ---------------------------------------------------------------------------------------------

    def alive(self) -> tuple[bool, dict[str, Any]]:
        dead = self.service.dead_threads()
        return not dead, {"alive": not dead, **({"dead_threads": dead} if dead else {})}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        database = self._database()
        checks = {"database": database, "consumers": self._consumers(),
                  "relay_leader": "unknown: database " + database if database.startswith("unreachable")
                  else self._leader()}
        not_ready = sorted(name for name, state in checks.items() if state != "ok")
        return not not_ready, {"ready": not not_ready, "not_ready": not_ready, "checks": checks}

    def _database(self) -> str:
        try:
            with self.engine.connect() as conn:
                revision = conn.execute(_REVISION).scalar() if conn.execute(_HAS_VERSION_TABLE).scalar() else None
        except Exception as exc:  # noqa: BLE001 - whatever it is, the answer is "not ready"
            return f"unreachable ({type(exc).__name__})"
        if revision != self.head:
            return f"not migrated: at revision {revision or '(none)'}, the code needs {self.head}"
        return "ok"

    def _consumers(self) -> str:
        service = self.service
        if not service.with_consumers:
            return "ok"  # this process runs the relay only
        if not service.consumers:
            return "not started yet"
        idle = sorted({c.queue for c in service.consumers if not c.consuming})
        return "ok" if not idle else "not consuming: " + ", ".join(idle)

    def _leader(self) -> str:
        try:
            with self.engine.connect() as conn:
                held = conn.execute(_LEADER, {"a": RELAY_LOCK[0], "b": RELAY_LOCK[1]}).scalar()
        except Exception as exc:  # noqa: BLE001
            return f"unknown ({type(exc).__name__})"
        return "ok" if held else "no relay holds the outbox lock"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, probes: Probes) -> None:
        self.probes = probes
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        probes = self.server.probes
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(HTTPStatus.OK, generate_latest(probes.registry), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, body = probes.alive() if path == "/healthz" else probes.ready()
            self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, json.dumps(body).encode(),
                       "application/json")
        else:
            self._send(HTTPStatus.NOT_FOUND, b'{"paths": ["/metrics", "/healthz", "/readyz"]}', "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes every few seconds: no log line
        pass


__all__ = ["Probes"]
