"""`/metrics`, `/healthz` and `/readyz` of the supervised `serve` on `METRICS_PORT`: one port for the whole family,
answered from the children's own endpoints (`service.probes`, each child on a private port of its own).

- `/metrics`: every child's exposition merged into one. A sample that several children have (same name and labels)
  is summed when it counts something (counters, histograms, summaries: the family's total, e.g. CPU seconds or
  messages handled by two consumer processes) and taken from the first child that has it otherwise (gauges such
  as the outbox backlog, which every child reads from the same database).
- `/healthz`: 200 while every child is alive and says so; 503 names the ones that are not.
- `/readyz`: 200 when every child is ready; each check says what the first child that found it not ok said.

While the supervisor has the database migrated, the short-lived child that does it answers on the port itself.
"""
from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHILD_TIMEOUT_S = 2.0  # a probe must answer before the orchestrator's own timeout
JSON = "application/json"
SUMMED = ("counter", "histogram", "summary", "gaugehistogram")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> OSError | None:
    """None if `port` can be listened on now, else why not."""
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", port))
    except OSError as exc:
        return exc
    return None


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=CHILD_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as answer:
        return answer.code, answer.read()


def merge_expositions(texts: Iterable[str]) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Any]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
                values[family.name] = {}
            seen = values[family.name]
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in seen:
                    seen[key] = s
                elif family.type in SUMMED and not s.name.endswith("_created"):
                    seen[key] = s._replace(value=seen[key].value + s.value)
    for name, merged in families.items():
        merged.samples = list(values[name].values())

    class _Collector:
        def collect(self) -> Iterable[Metric]:
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)


class FamilyProbes:
    """The family's endpoints; `children()` names the live children and their private ports."""

    def __init__(self, port: int, children: Callable[[], list[tuple[str, int | None]]]) -> None:
        self.port = port
        self.children = children
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> OSError | None:
        try:
            self._server = ThreadingHTTPServer(("", self.port), _Handler)
        except OSError as exc:
            return exc
        self._server.daemon_threads = True
        self._server.family = self  # type: ignore[attr-defined]
        threading.Thread(target=self._server.serve_forever, name="family-probes", daemon=True).start()
        return None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def answer(self, path: str) -> tuple[int, bytes, str]:
        """(status, body, content type) of a GET of `path`."""
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            return HTTPStatus.OK, self.metrics(), CONTENT_TYPE_LATEST
        if path in ("/healthz", "/readyz"):
            ok, body = self.alive() if path == "/healthz" else self.ready()
            return HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, json.dumps(body).encode(), JSON
        return HTTPStatus.NOT_FOUND, b'{"paths": ["/metrics", "/healthz", "/readyz"]}', JSON

    def metrics(self) -> bytes:
        texts = []
        for _name, port in self.children():
            if port is not None:
                try:
                    status, body = _get(port, "/metrics")
                except OSError:
                    continue  # a child starting or restarting: the others still count
                if status == HTTPStatus.OK:
                    texts.append(body.decode())
        return merge_expositions(texts)

    def alive(self) -> tuple[bool, dict[str, Any]]:
        down = [name for name, port in self.children() if not self._answers(port, "/healthz")[0]]
        return not down, {"alive": not down, **({"not_alive": down} if down else {})}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, str] = {}
        for name, port in self.children():
            ok, body = self._answers(port, "/readyz")
            child_checks = body.get("checks") if isinstance(body, dict) else None
            if not isinstance(child_checks, dict):
                checks[name] = "not answering"
                continue
            for check, state in child_checks.items():
                if checks.get(check, "ok") == "ok":
                    checks[check] = state
        not_ready = sorted(name for name, state in checks.items() if state != "ok")
        return not not_ready, {"ready": not not_ready, "not_ready": not_ready, "checks": checks}

    @staticmethod
    def _answers(port: int | None, path: str) -> tuple[bool, Any]:
        if port is None:
            return False, None
        try:
            status, body = _get(port, path)
            return status == HTTPStatus.OK, json.loads(body)
        except (OSError, ValueError):
            return False, None


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        status, body, content_type = self.server.family.answer(self.path.split("?", 1)[0])  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:  # probes every few seconds: no log line
        pass


__all__ = ["FamilyProbes", "free_port", "merge_expositions", "port_free"]
