"""What the end-to-end tests drive the real service with: the service as a subprocess (`ServiceProcess`), one
AMQP connection playing every client at once (`Wire`: commands and their replies, a tap on `intyg.events`,
recipient queues and dead-letter queues), and a few SQL look-ups (`Db`)."""
from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.data
import psycopg

from contracts.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from service.testdata import random_personnummer
from service.topology import declare_exchanges

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "service started"
_UNSET: Any = object()

# Settings the parent environment must not leak into a service under test (pydantic-settings reads any case).
SERVICE_ENV_KEYS = {"AMQP_URL", "DATABASE_URL", "CERTIFICATE_TYPES", "RECIPIENTS", "MAX_BODY_BYTES", "PREFETCH",
                    "BATCH_SIZE", "BATCH_WAIT_MS", "RETRY_DELAYS_S", "REVOKE_WAIT_S", "BULK_BATCH_SIZE",
                    "RELAY_BATCH_SIZE", "RELAY_POLL_S", "ENFORCE_ROLES", "ROLES", "LOG_LEVEL", "LOG_SALT",
                    "PARALLEL_CONSUMERS", "CONSUMER_PROCESSES", "RECONNECT_MAX_S", "HEADER_SIGNING_KEY",
                    "METRICS_PORT", "TEST_CRASH_AFTER_COMMIT"}


# ------------------------------------------------------------------------------------------------------------------
# the service process
# ------------------------------------------------------------------------------------------------------------------


def service_env(**settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in SERVICE_ENV_KEYS and not k.startswith("OTEL_")}
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in settings.items():
        if value is None:
            continue
        env[key.upper()] = value if isinstance(value, str) else json.dumps(value)
    return env


def cli(*args: str) -> list[str]:
    """`intygstjanst ARGS` with this interpreter (works whether or not the console script is on PATH)."""
    return [sys.executable, "-m", "service.cli", *args]


def dlq_cli(amqp_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`intygstjanst dlq ARGS` as the broker user of `amqp_url`."""
    return subprocess.run(cli("dlq", *args), cwd=REPO, env=service_env(AMQP_URL=amqp_url), capture_output=True,
                          text=True, timeout=60)


class ServiceProcess:
    """`intygstjanst serve` in a subprocess; stdout and stderr go to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.log_path = log_path
        self.args = args  # after `serve`: --no-relay, --relay-only
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, *, ready: bool = True, timeout: float = 60.0) -> ServiceProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        command = cli("serve", *self.args)
        if "TEST_CRASH_AFTER_COMMIT" in self.env:  # the same service with a fault injected (crashing_serve.py)
            command = [sys.executable, str(REPO / "tests" / "e2e" / "crashing_serve.py"), "serve", *self.args]
        self.proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if ready:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def consumer_restarts(self) -> list[dict[str, Any]]:
        """Log lines of a consumer whose session ended (a bug in the loop or a lost channel) and started again."""
        return [line for line in self.log_lines()
                if line.get("event") == "consumer failed" or "reconnecting" in str(line.get("event", ""))]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.log_text():
            if not self.running:
                raise AssertionError(f"service exited with {self.returncode} before it was ready:\n"
                                     f"{self.log_text()[-5000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"service not ready within {timeout}s:\n{self.log_text()[-5000:]}")
            time.sleep(0.05)

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout}s")
            time.sleep(0.05)

    def terminate(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        if self.running:
            self.proc.kill()
        return self.wait(10)

    def wait(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"service did not exit within {timeout}s (killed):\n{self.log_text()[-5000:]}")
        finally:
            if self._log is not None and self.proc.poll() is not None:
                self._log.close()
                self._log = None
        return code


# ------------------------------------------------------------------------------------------------------------------
# the wire: every client on one connection
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Msg:
    routing_key: str
    properties: pika.BasicProperties
    raw: bytes
    exchange: str = ""

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.raw)

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})


class Wire:
    """One BlockingConnection: publishes commands (with publisher confirms and `mandatory`), collects replies on a
    private exclusive queue (several replies per correlation id are kept: duplicates are counted), and taps
    `intyg.events` with an exclusive queue bound to `#`."""

    def __init__(self, amqp_url: str, *, tap_events: bool = True) -> None:
        self.url = amqp_url
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.reply_queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.replies: dict[str | None, list[Msg]] = defaultdict(list)
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)
        self.events: list[Msg] = []
        declare_exchanges(self.channel)  # as the service declares them (idempotent)
        if tap_events:
            self.event_queue = self.channel.queue_declare("", exclusive=True).method.queue
            self.channel.queue_bind(self.event_queue, EVENTS_EXCHANGE, "#")
            self.channel.basic_consume(self.event_queue, self._on_event, auto_ack=True)

    def _on_reply(self, _ch: Any, method: Any, properties: Any, body: bytes) -> None:
        self.replies[properties.correlation_id].append(Msg(method.routing_key, properties, body, method.exchange))

    def _on_event(self, _ch: Any, method: Any, properties: Any, body: bytes) -> None:
        self.events.append(Msg(method.routing_key, properties, body, method.exchange))

    # -- commands and replies -----------------------------------------------------------------------------------

    def send(self, routing_key: str, body: dict[str, Any] | bytes, *, message_id: str | None = _UNSET,
             reply: bool = True, exchange: str = COMMANDS_EXCHANGE, mandatory: bool = True,
             **properties: Any) -> str | None:
        """Publish (confirmed); returns the message_id. `message_id=None` sends none."""
        if message_id is _UNSET:
            message_id = f"m-{uuid.uuid4()}"
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        props = {"content_type": "application/json", "delivery_mode": 2, **properties}
        if message_id is not None:
            props["message_id"] = message_id
        if reply:
            props["reply_to"] = self.reply_queue
        self.channel.basic_publish(exchange, routing_key, raw, pika.BasicProperties(**props), mandatory=mandatory)
        return message_id

    def reply(self, correlation_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """The body of the first reply to `correlation_id` (waits for it)."""
        return self.reply_msg(correlation_id, timeout).body

    def reply_msg(self, correlation_id: str, timeout: float = 15.0) -> Msg:
        self.pump_until(lambda: bool(self.replies.get(correlation_id)), timeout,
                        f"no reply to {correlation_id}")
        return self.replies[correlation_id][0]

    def call(self, routing_key: str, body: dict[str, Any], timeout: float = 15.0, **kw: Any) -> dict[str, Any]:
        message_id = self.send(routing_key, body, **kw)
        assert message_id is not None
        return self.reply(kw.get("correlation_id") or message_id, timeout)

    # -- events ---------------------------------------------------------------------------------------------------

    def events_where(self, routing_key: str | None = None, **fields: Any) -> list[Msg]:
        return [e for e in self.events if (routing_key is None or e.routing_key == routing_key)
                and all(e.body.get(k) == v for k, v in fields.items())]

    def wait_events(self, routing_key: str, count: int = 1, timeout: float = 15.0, **fields: Any) -> list[Msg]:
        self.pump_until(lambda: len(self.events_where(routing_key, **fields)) >= count, timeout,
                        f"fewer than {count} {routing_key} {fields}")
        return self.events_where(routing_key, **fields)

    # -- plumbing -------------------------------------------------------------------------------------------------

    def pump(self, seconds: float = 0.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.connection.process_data_events(time_limit=max(0.0, min(0.05, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                return

    def pump_until(self, condition: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} within {timeout}s")
            self.connection.process_data_events(time_limit=0.05)

    def take(self, queue: str, *, count: int | None = None, timeout: float = 5.0,
             settle: float = 0.3) -> list[Msg]:
        """Take (ack) messages from `queue`: `count` of them (waiting up to `timeout`), or, without `count`,
        everything until the queue stayed empty for `settle` seconds."""
        out: list[Msg] = []
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while True:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is not None:
                out.append(Msg(method.routing_key, properties, body, method.exchange))
                quiet_since = time.monotonic()
                if count is not None and len(out) >= count:
                    return out
                continue
            now = time.monotonic()
            if count is None and now - quiet_since >= settle:
                return out
            if now > deadline:
                if count is not None:
                    raise AssertionError(f"{queue}: {len(out)} of {count} messages within {timeout}s")
                return out
            self.pump(0.05)

    def ready(self, queue: str) -> int:
        return self.channel.queue_declare(queue, passive=True).method.message_count

    def consumers(self, queue: str) -> int:
        """How many consumers the broker counts on `queue` now."""
        return self.channel.queue_declare(queue, passive=True).method.consumer_count

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


@contextmanager
def amqp_doubles() -> Iterator[None]:
    """Let pika encode Python floats in field tables as AMQP doubles (`d`), which other clients send and pika
    decodes but refuses to encode: a hostile client is not limited to what pika writes."""
    encode_value = pika.data.encode_value

    def with_doubles(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, float):
            pieces.append(struct.pack(">cd", b"d", value))
            return 9
        return encode_value(pieces, value)

    pika.data.encode_value = with_doubles
    try:
        yield
    finally:
        pika.data.encode_value = encode_value


# ------------------------------------------------------------------------------------------------------------------
# the database
# ------------------------------------------------------------------------------------------------------------------


class Db:
    def __init__(self, url: str) -> None:
        self.url = url

    def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            return conn.execute(query, params).fetchall()

    def scalar(self, query: str, *params: Any) -> Any:
        rows = self.rows(query, *params)
        return rows[0][0] if rows else None


# ------------------------------------------------------------------------------------------------------------------
# test data
# ------------------------------------------------------------------------------------------------------------------


def new_patient() -> str:
    return random_personnummer(random)


def new_id(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4()}"


def walk(value: Any) -> Iterable[tuple[str, Any]]:
    """Every (key, value) pair anywhere inside a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v)


# ------------------------------------------------------------------------------------------------------------------
# the HTTP endpoints (METRICS_PORT)
# ------------------------------------------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """`/metrics` parsed with prometheus_client's own parser: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        exposition = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(exposition) for s in family.samples}


def sample(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The value of one sample (0 when absent: a counter nobody incremented yet has no sample)."""
    return metrics.get((name, frozenset(labels.items())), 0.0)


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of `/healthz` or `/readyz`."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it returns something true (and return that); connection errors count as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except OSError as exc:  # the endpoint is not listening yet
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout}s (last: {last!r})")
