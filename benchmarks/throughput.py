"""End-to-end benchmark of the running service: registrations/s with every reply and event published, reply latency
at a steady offered load, and a bare per-message reference loop on the same broker and database.

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        python benchmarks/throughput.py
    python benchmarks/throughput.py -n 10000 --rate 200 --duration 20 --env PARALLEL_CONSUMERS=2
    python benchmarks/throughput.py --in-process      # the Service in this process (threads) instead

What it does:
1. creates a vhost `intyg-bench-<hex>` (rabbitmqctl) and a database `intyg_bench_<hex>` next to AMQP_URL /
   DATABASE_URL (or uses `--vhost` / `--database`), migrates it, and removes both afterwards unless `--keep`;
2. starts, side by side, each in processes of its own: the real service (`python -m service.cli serve`, the
   supervised relay and consumer processes, like production; `--serve-args=--single-process` for one process),
   the BARE reference loop (consume with manual ack and the same prefetch, one INSERT per message in autocommit,
   publish the reply, ack) and (e) a PIPELINED loop with no database at all (consume, publish the reply with
   confirms without waiting, ack in batches as confirms arrive: the ceiling of any Python service on this broker);
3. after an untimed warm-up of each, runs `--rounds` rounds (3); each round, alternating:
   (a) the service, (c) the bare loop, (e) the pipelined loop: `-n` registrations (documents of `--document-kb`
   KB, distinct ids and patients) through a publisher-confirm window of `--window` messages, with `reply_to` an
   exclusive queue (and, for the service, an exclusive queue bound to `intyg.events` for
   `certificate.registered`); the rate is N divided by the time from the first publish until every reply (AND
   every event) has arrived; then (b) the service's and (d) the bare loop's reply latency at a steady `--rate`
   msg/s for `--duration` s, each after a pause of `--settle` s (the throughput bursts leave the broker and
   PostgreSQL work to finish: queue segments, checkpoints, autovacuum, which hit whichever ran next), taking turns
   at going first;
4. prints every figure round by round and the median, and the ratios of each round (measured side by side, so
   that a load that comes and goes hits both alike) with their median.
For (a), (c), (e) it also prints the CPU time per message of the processes under test (the service: the
supervisor and its children), the broker, PostgreSQL and this client, and how busy every other process of the
machine was, and the load average before and after each round (a busy neighbour skews every figure).
It prints figures; it is not a test.

    git worktree add /tmp/before <commit>                  # the same benchmark against an older service
    python benchmarks/throughput.py --service-root /tmp/before
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pika  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from service.testdata import personnummer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMMANDS_EXCHANGE = "intyg.commands"
EVENTS_EXCHANGE = "intyg.events"
REGISTRATION_QUEUE = "intyg.registration"
BARE_QUEUE = "bench.bare"
PIPELINED_QUEUE = "bench.pipelined"
BARE_TABLE = "bench_bare_registrations"


# --------------------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------------------


class Messages:
    """Distinct registrations: certificate `bench-<run>-<n>`, a patient of its own, a document of `kb` KB."""

    def __init__(self, run: str, document_kb: int) -> None:
        self.run = run
        rng = random.Random(42)
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(400)]
        text = []
        size = 0
        while size < document_kb * 1024:
            word = rng.choice(words)
            text.append(word)
            size += len(word) + 1
        self.filler = " ".join(text)[: max(0, document_kb * 1024 - 64)]
        self.next = 0

    def take(self) -> tuple[str, bytes]:
        n = self.next
        self.next += 1
        cid = f"bench-{self.run}-{n}"
        born = dt.date(1940, 1, 1) + dt.timedelta(days=n % 25_000)
        patient = personnummer(born, (n // 25_000) % 999 + 1)
        body = {"certificate": {
            "id": cid, "type": "lisjp", "type_version": "1.3", "patient_id": patient,
            "signed_at": "2026-11-25T09:30:00+01:00", "valid_from": "2026-11-25", "valid_to": "2026-12-24",
            "issued_by": {"person_id": "SE2321000016-1003", "name": "Ajla Doktor",
                          "care_unit": {"id": f"SE2321000016-{1004 + n % 50}", "name": "Vårdenhet"},
                          "care_giver": {"id": f"SE2321000016-{1000 + n % 21}", "name": "Vårdgivare"}},
            "test_certificate": False, "relations": [],
            "document": {"media_type": "application/xml", "encoding": "utf-8",
                         "content": f"<intyg id=\"{cid}\">{self.filler}</intyg>"}}}
        return cid, json.dumps(body).encode()


# --------------------------------------------------------------------------------------------------------------
# The driver: one SelectConnection, a confirm-mode publisher channel and a consumer channel
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    sent: int = 0
    confirmed: int = 0
    nacked: int = 0
    replies: dict[str, float] = field(default_factory=dict)  # message id -> reply arrival (perf_counter)
    results: dict[str, int] = field(default_factory=dict)  # OK / INFO code / ERROR code -> count
    events: set[str] = field(default_factory=set)
    sent_at: dict[str, float] = field(default_factory=dict)
    first_sent: float = 0.0
    last_sent: float = 0.0
    done_at: float = 0.0
    timed_out: bool = False
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds used during the run, by process group
    peak_rss_mb: float = 0.0  # resident memory of the process(es) under test, summed, at its highest
    peak_pss_mb: float = 0.0  # the same as PSS: a page shared by N of them counts 1/N in each, so once in the sum

    @property
    def elapsed(self) -> float:
        return self.done_at - self.first_sent

    def latencies_ms(self) -> list[float]:
        return sorted((self.replies[m] - self.sent_at[m]) * 1000 for m in self.replies if m in self.sent_at)


def parents() -> dict[int, int]:
    """Every process of the machine (that this one sees) -> its parent."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                found[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    return found


def family(roots: set[int], parents: dict[int, int]) -> set[int]:
    """`roots` and their descendants: the supervised serve's children (and theirs) are the service too."""
    found = set(roots)
    grew = True
    while grew:
        before = len(found)
        found |= {pid for pid, parent in parents.items() if parent in found}
        grew = len(found) > before
    return found


class CpuMeter:
    """CPU seconds (user + system, from /proc) used during a run by: the process under test (the service or the
    bare loop), the broker (beam.smp), PostgreSQL (every backend: also other clients'), this client, and every
    other process of the machine (a busy neighbour shows up there)."""

    def __init__(self, server_pids: Callable[[], set[int]]) -> None:
        self.server_pids = server_pids
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start: dict[str, float] = {}

    def snapshot(self) -> dict[str, float]:
        totals = {"server": 0.0, "broker": 0.0, "postgres": 0.0, "client": 0.0, "other": 0.0}
        if not os.path.isdir("/proc"):
            return totals
        stats: dict[int, tuple[str, int, float]] = {}  # pid -> (name, parent, CPU seconds)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            stats[int(pid)] = (stat[stat.index("(") + 1: stat.rindex(")")], int(fields[1]),
                               (int(fields[11]) + int(fields[12])) / self.tick)
        server = family(self.server_pids(), {pid: parent for pid, (_n, parent, _u) in stats.items()})
        for pid, (name, _parent, used) in stats.items():
            if pid in server:
                group = "server"
            elif pid == os.getpid():
                group = "client"
            elif name == "beam.smp":
                group = "broker"
            elif name == "postgres":
                group = "postgres"
            else:
                group = "other"
            totals[group] += used
        return totals

    def begin(self) -> None:
        self.start = self.snapshot()
        self.peak_rss_mb = self.peak_pss_mb = 0.0
        self._sampling = threading.Event()
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def _sample_rss(self) -> None:
        """The resident memory of the process(es) under test, summed, every half second, as RSS and as PSS (shared
        pages counted once; /proc/PID/smaps_rollup); keeps the peak of each."""
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._sampling.wait(0.5):
            total = pss_kb = 0
            for pid in family(self.server_pids(), parents()):
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        total += int(f.read().split()[1]) * page
                    with open(f"/proc/{pid}/smaps_rollup") as f:
                        pss_kb += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
                except OSError:
                    continue
            self.peak_rss_mb = max(self.peak_rss_mb, total / 2**20)
            self.peak_pss_mb = max(self.peak_pss_mb, pss_kb / 2**10)

    def end(self) -> dict[str, float]:
        self._sampling.set()
        now = self.snapshot()
        # processes that ended during the run take their CPU with them: clamp at zero
        return {k: max(0.0, now[k] - self.start.get(k, 0.0)) for k in now}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


class Driver:
    """Publishes `count` messages (`window` unconfirmed at most, or `rate` per second) and collects replies and,
    when `events` is set, `certificate.registered` events, until all arrived or `timeout` s passed."""

    def __init__(self, amqp_url: str, *, exchange: str, routing_key: str, messages: Messages, count: int,
                 name: str, window: int = 1000, rate: float | None = None, events: bool = True,
                 timeout: float = 300.0, on_confirmed: Callable[[], None] | None = None) -> None:
        self.on_confirmed = on_confirmed  # called once every message is confirmed (the backlog is in the queue)
        self.amqp_url, self.exchange, self.routing_key = amqp_url, exchange, routing_key
        self.messages, self.count, self.window, self.rate = messages, count, window, rate
        self.want_events, self.timeout = events, timeout
        self.run = Run(name)
        self.ids: dict[int, str] = {}  # delivery tag -> message id (unconfirmed)
        self.unconfirmed: deque[int] = deque()
        self.tag = 0
        self.reply_queue = ""
        self.pub: Any = None
        self.conn: Any = None
        self.started = 0.0

    def go(self) -> Run:
        params = pika.URLParameters(self.amqp_url)
        params.heartbeat = 0 if self.rate is None else 60
        self.conn = pika.SelectConnection(params, on_open_callback=self._opened,
                                          on_open_error_callback=lambda _c, e: self._fail(e),
                                          on_close_callback=lambda *_: self.conn.ioloop.stop())
        self.conn.ioloop.start()
        return self.run

    def _fail(self, error: Any) -> None:
        print(f"broker connection failed: {error}", file=sys.stderr)
        self.conn.ioloop.stop()

    def _opened(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._sub_open)

    def _sub_open(self, channel: Any) -> None:
        self.sub = channel
        channel.queue_declare("", exclusive=True, auto_delete=True, callback=self._reply_queue)

    def _reply_queue(self, frame: Any) -> None:
        self.reply_queue = frame.method.queue
        self.sub.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)
        if self.want_events:
            self.sub.queue_declare("", exclusive=True, auto_delete=True, callback=self._events_queue)
        else:
            self.conn.channel(on_open_callback=self._pub_open)

    def _events_queue(self, frame: Any) -> None:
        queue = frame.method.queue
        self.sub.queue_bind(queue, EVENTS_EXCHANGE, "certificate.registered",
                            callback=lambda _f: (self.sub.basic_consume(queue, self._on_event, auto_ack=True),
                                                 self.conn.channel(on_open_callback=self._pub_open)))

    def _pub_open(self, channel: Any) -> None:
        self.pub = channel
        channel.confirm_delivery(self._on_confirm, callback=lambda _f: self._start())

    def _start(self) -> None:
        self.started = time.perf_counter()
        self.conn.ioloop.call_later(1.0, self._watchdog)
        if self.rate is None:
            self._fill()
        else:
            self._tick()

    def _publish_one(self) -> None:
        mid, body = self.messages.take()
        now = time.perf_counter()
        if not self.run.sent:
            self.run.first_sent = now
        self.run.sent_at[mid] = now
        self.run.last_sent = now
        self.tag += 1
        self.ids[self.tag] = mid
        self.unconfirmed.append(self.tag)
        self.pub.basic_publish(self.exchange, self.routing_key, body, pika.BasicProperties(
            message_id=mid, content_type="application/json", delivery_mode=2, reply_to=self.reply_queue,
            type=self.routing_key if self.exchange else None))
        self.run.sent += 1

    def _fill(self) -> None:
        while self.run.sent < self.count and len(self.unconfirmed) < self.window:
            self._publish_one()

    def _tick(self) -> None:
        assert self.rate is not None
        due = min(self.count, int((time.perf_counter() - self.started) * self.rate) + 1)
        while self.run.sent < due:
            self._publish_one()
        if self.run.sent < self.count:
            self.conn.ioloop.call_later(max(0.0, (self.run.sent / self.rate) - (time.perf_counter() - self.started)),
                                        self._tick)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ack = isinstance(method, pika.spec.Basic.Ack)
        tags = []
        if method.multiple:
            while self.unconfirmed and self.unconfirmed[0] <= method.delivery_tag:
                tags.append(self.unconfirmed.popleft())
        else:
            try:
                self.unconfirmed.remove(method.delivery_tag)
                tags.append(method.delivery_tag)
            except ValueError:
                pass
        for tag in tags:
            self.ids.pop(tag, None)
            if ack:
                self.run.confirmed += 1
            else:
                self.run.nacked += 1
        if self.on_confirmed is not None and self.run.confirmed + self.run.nacked >= self.count:
            self.on_confirmed()
            self.on_confirmed = None
        if self.rate is None:
            self._fill()

    def _on_reply(self, _ch: Any, _method: Any, properties: Any, body: bytes) -> None:
        mid = properties.correlation_id
        if mid in self.run.replies or mid not in self.run.sent_at:
            return
        self.run.replies[mid] = time.perf_counter()
        reply = json.loads(body)
        key = reply.get("code") or reply.get("result", "?")
        self.run.results[key] = self.run.results.get(key, 0) + 1
        self._check_done()

    def _on_event(self, _ch: Any, _method: Any, _properties: Any, body: bytes) -> None:
        cid = json.loads(body).get("certificate_id")
        if cid in self.run.sent_at:
            self.run.events.add(cid)
            self._check_done()

    def _check_done(self) -> None:
        if (len(self.run.replies) >= self.count and (not self.want_events or len(self.run.events) >= self.count)
                and not self.run.done_at):
            self.run.done_at = time.perf_counter()
            self.conn.close()

    def _watchdog(self) -> None:
        if self.run.done_at:
            return
        if time.perf_counter() - self.started > self.timeout:
            self.run.timed_out = True
            self.run.done_at = time.perf_counter()
            self.conn.close()
            return
        self.conn.ioloop.call_later(1.0, self._watchdog)


# --------------------------------------------------------------------------------------------------------------
# The bare reference loop (run as `--bare-worker` in a process of its own)
# --------------------------------------------------------------------------------------------------------------


def bare_worker(amqp_url: str, database_url: str, prefetch: int) -> None:
    db = psycopg.connect(database_url, autocommit=True)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    insert = f"INSERT INTO {BARE_TABLE} (id, patient_id, body) VALUES (%s, %s, %s)"

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        certificate = json.loads(body)["certificate"]
        db.execute(insert, (certificate["id"], certificate["patient_id"], body.decode()))
        reply = json.dumps({"result": "OK", "error_id": None, "code": None, "message": "registered",
                            "request_id": properties.message_id, "data": None}).encode()
        ch.basic_publish("", properties.reply_to, reply, pika.BasicProperties(
            correlation_id=properties.message_id, content_type="application/json", delivery_mode=2))
        ch.basic_ack(method.delivery_tag)

    signal.signal(signal.SIGTERM, lambda *_: channel.stop_consuming())
    channel.basic_consume(BARE_QUEUE, on_message, auto_ack=False)
    print("bare worker consuming", flush=True)
    channel.start_consuming()
    connection.close()


def pipelined_worker(amqp_url: str, prefetch: int) -> None:
    """(e) The ceiling: no database at all. One channel in confirm mode consumes, publishes each reply at once
    (never waiting for its confirm), and acknowledges the deliveries whose replies are confirmed, `multiple` up to
    the newest, as the broker's confirms arrive in batches."""
    state: dict[str, Any] = {"seq": 0, "pending": deque()}  # (publish seq, delivery tag), oldest first

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        certificate = json.loads(body)["certificate"]
        reply = json.dumps({"result": "OK", "error_id": None, "code": None, "message": "registered",
                            "request_id": properties.message_id, "data": {"certificate_id": certificate["id"]}})
        ch.basic_publish("", properties.reply_to, reply.encode(), pika.BasicProperties(
            correlation_id=properties.message_id, content_type="application/json", delivery_mode=2))
        state["seq"] += 1
        state["pending"].append((state["seq"], method.delivery_tag))

    def on_confirm(frame: Any) -> None:
        confirmed, pending, newest = frame.method.delivery_tag, state["pending"], None
        while pending and (pending[0][0] <= confirmed if frame.method.multiple else pending[0][0] == confirmed):
            newest = pending.popleft()[1]
        if newest is not None:
            channel.basic_ack(newest, multiple=True)

    def on_channel(ch: Any) -> None:
        nonlocal channel
        channel = ch
        ch.basic_qos(prefetch_count=prefetch, callback=lambda _f: ch.confirm_delivery(
            on_confirm, callback=lambda _f: (ch.basic_consume(PIPELINED_QUEUE, on_message, auto_ack=False),
                                             print("pipelined worker consuming", flush=True))))

    channel: Any = None
    connection = pika.SelectConnection(pika.URLParameters(amqp_url),
                                       on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
                                       on_close_callback=lambda *_: connection.ioloop.stop())
    signal.signal(signal.SIGTERM, lambda *_: connection.ioloop.add_callback_threadsafe(connection.close))
    connection.ioloop.start()


# --------------------------------------------------------------------------------------------------------------
# Set-up: vhost, database, service process
# --------------------------------------------------------------------------------------------------------------


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60)


def with_vhost(amqp_url: str, vhost: str) -> str:
    params = pika.URLParameters(amqp_url)
    user = params.credentials.username
    password = params.credentials.password
    return (f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{params.host}:{params.port}/"
            f"{quote(vhost, safe='')}")


def with_database(database_url: str, name: str) -> str:
    return make_url(database_url).set(database=name).render_as_string(hide_password=False)


def plain(database_url: str) -> str:
    """A libpq URL for psycopg (no `+driver`)."""
    url = make_url(database_url)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def wait_consumers(amqp_url: str, queue: str, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise SystemExit(f"the process serving {queue} exited; see its log")
        try:
            connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
            try:
                frame = connection.channel().queue_declare(queue, passive=True)
                if frame.method.consumer_count > 0:
                    return
            finally:
                connection.close()
        except pika.exceptions.ChannelClosedByBroker:
            pass  # not declared yet
        except pika.exceptions.AMQPConnectionError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"nobody consumes {queue} after {timeout:.0f}s")


class ExternalService:
    pids: set[int] = set()

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass


class ServiceProcess:
    def __init__(self, amqp_url: str, database_url: str, env: dict[str, str], log_path: Path,
                 in_process: bool, serve_args: list[str] | None = None, root: Path = ROOT) -> None:
        self.in_process = in_process
        self.processes: list[subprocess.Popen] = []
        self.log_path = log_path
        settings_env = {"AMQP_URL": amqp_url, "DATABASE_URL": database_url, **env}
        if in_process:
            from service.logging import configure
            from service.settings import Settings
            from service.app import Service

            self.log_file = open(log_path, "w")  # noqa: SIM115
            settings = Settings(**{k.lower(): v for k, v in settings_env.items()})
            configure(settings.log_level, stream=self.log_file)
            self.service = Service(settings)
            self.service.start()
        else:
            self.log_file = open(log_path, "w")  # noqa: SIM115
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", *(serve_args or [])], cwd=root,
                env={**os.environ, **settings_env, "PYTHONPATH": str(root)},
                stdout=self.log_file, stderr=subprocess.STDOUT))

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.processes}

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def stop(self) -> None:
        if not self.processes:
            self.service.stop()
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log_file.close()


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def fmt_ms(v: float) -> str:
    return f"{v:8.1f} ms"


def cpu_line(run: Run, server: str) -> str:
    n = max(1, len(run.replies))
    c = run.cpu
    return (f"    CPU ms per message: {server} {c.get('server', 0) * 1000 / n:.2f}"
            f", broker {c.get('broker', 0) * 1000 / n:.2f}"
            f", postgres {c.get('postgres', 0) * 1000 / n:.2f}, client {c.get('client', 0) * 1000 / n:.2f}"
            f"; other processes {c.get('other', 0) / max(1e-9, run.elapsed):.2f} cores")


def describe(run: Run) -> str:
    results = ", ".join(f"{k} {v}" for k, v in sorted(run.results.items()))
    extra = " TIMED OUT" if run.timed_out else ""
    return f"replies {len(run.replies)} ({results}), events {len(run.events)}, nacked {run.nacked}{extra}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Worker:
    """A reference loop (`--bare-worker` / `--pipelined-worker`) in a process of its own."""

    def __init__(self, kind: str, args: argparse.Namespace, amqp_url: str, database_url: str, log: Path) -> None:
        self.log = open(log, "w")  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), f"--{kind}-worker",
                                         "--amqp-url", amqp_url, "--database-url", database_url,
                                         "--prefetch", str(args.prefetch)],
                                        cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.pids = {self.process.pid}

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@dataclass
class Target:
    """What one line of the benchmark drives: where its messages go and who handles them."""
    key: str
    name: str
    exchange: str
    routing_key: str
    events: bool
    server: Any
    messages: Messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    parser.add_argument("--database-url",
                        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--vhost", help="use this existing vhost (default: create intyg-bench-<hex>)")
    parser.add_argument("--database", help="use this existing database (default: create intyg_bench_<hex>)")
    parser.add_argument("--keep", action="store_true", help="keep the vhost and database created")
    parser.add_argument("-n", "--registrations", type=int, default=5000, help="(a), (c), (e): messages (5000)")
    parser.add_argument("--warmup", type=int, default=500, help="untimed messages before the rounds (500)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; figures are their median (3)")
    parser.add_argument("--document-kb", type=int, default=20, help="document size in KB (20)")
    parser.add_argument("--window", type=int, default=1000, help="unconfirmed publishes at most (1000)")
    parser.add_argument("--rate", type=float, default=200.0, help="(b), (d): offered msg/s (200)")
    parser.add_argument("--duration", type=float, default=20.0, help="(b), (d): seconds (20)")
    parser.add_argument("--settle", type=float, default=5.0, help="(b), (d): pause before each, seconds (5)")
    parser.add_argument("--prefetch", type=int, default=200,
                        help="the reference loops' prefetch (200, the service's default)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the service, e.g. CONSUMER_PROCESSES=2 (repeatable)")
    parser.add_argument("--in-process", action="store_true", help="run the Service in this process (threads)")
    parser.add_argument("--service-root", type=Path, default=ROOT,
                        help="run the service (and the migration) from this checkout, e.g. a `git worktree` of an "
                             "older commit, to compare before and after on the same machine")
    parser.add_argument("--serve-args", default="",
                        help="arguments of `serve`, e.g. --serve-args=--single-process (default: the supervised "
                             "processes)")
    parser.add_argument("--backlog", type=int, default=0,
                        help="at the end, with the service paused (SIGSTOP), queue this many registrations, let it "
                             "go on (SIGCONT) and report its peak resident memory while it works them off")
    parser.add_argument("--external-service", action="store_true",
                        help="do not start the service: one already serves --vhost/--database (e.g. under a profiler)")
    parser.add_argument("--skip", action="append", default=[], choices=["a", "b", "c", "d", "e"],
                        help="skip a part (d: the bare loop's latency at --rate, for comparison with b)")
    parser.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pipelined-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.bare_worker:
        bare_worker(args.amqp_url, plain(args.database_url), args.prefetch)
        return 0
    if args.pipelined_worker:
        pipelined_worker(args.amqp_url, args.prefetch)
        return 0

    env = dict(item.split("=", 1) for item in args.env)
    env.setdefault("LOG_LEVEL", "INFO")
    run_tag = uuid.uuid4().hex[:8]
    vhost = args.vhost or f"intyg-bench-{run_tag}"
    database = args.database or f"intyg_bench_{run_tag}"
    server_db = plain(args.database_url)
    if not args.vhost:
        rabbitmqctl("add_vhost", vhost)
        user = pika.URLParameters(args.amqp_url).credentials.username
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    if not args.database:
        with psycopg.connect(server_db, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    amqp_url = with_vhost(args.amqp_url, vhost)
    database_url = with_database(server_db, database)
    workdir = Path(tempfile.mkdtemp(prefix="intyg-bench-"))
    print(f"vhost {vhost}, database {database}, logs in {workdir}; load {load()}", flush=True)

    if args.service_root.resolve() == ROOT:
        from storage import migrate

        migrate.upgrade(database_url)
    else:
        subprocess.run([sys.executable, "-m", "service.cli", "migrate"], cwd=args.service_root, check=True,
                       env={**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(args.service_root)})
    with psycopg.connect(plain(database_url), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {BARE_TABLE} "
                     "(id text PRIMARY KEY, patient_id char(12) NOT NULL, body text NOT NULL)")
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    for queue in (BARE_QUEUE, PIPELINED_QUEUE):
        connection.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    connection.close()

    results: dict[str, list[Run]] = {k: [] for k in "abcde"}
    loads = [load()]
    servers: list[Any] = []
    try:
        targets: list[Target] = []
        if set("ab") - set(args.skip):
            service = (ExternalService() if args.external_service else
                       ServiceProcess(amqp_url, database_url, env, workdir / "service.log", args.in_process,
                                      args.serve_args.split(), args.service_root))
            servers.append(service)
            wait_consumers(amqp_url, REGISTRATION_QUEUE, 120, service.alive)
            targets.append(Target("a", "service", COMMANDS_EXCHANGE, "certificate.register", True, service,
                                  Messages(run_tag, args.document_kb)))
        if set("cd") - set(args.skip):
            bare = Worker("bare", args, amqp_url, database_url, workdir / "bare.log")
            servers.append(bare)
            wait_consumers(amqp_url, BARE_QUEUE, 30, bare.alive)
            targets.append(Target("c", "bare", "", BARE_QUEUE, False, bare, Messages(run_tag + "b", args.document_kb)))
        if "e" not in args.skip:
            pipelined = Worker("pipelined", args, amqp_url, database_url, workdir / "pipelined.log")
            servers.append(pipelined)
            wait_consumers(amqp_url, PIPELINED_QUEUE, 30, pipelined.alive)
            targets.append(Target("e", "pipelined", "", PIPELINED_QUEUE, False, pipelined,
                                  Messages(run_tag + "e", args.document_kb)))

        def drive(target: Target, name: str, **how: Any) -> Run:
            return Driver(amqp_url, exchange=target.exchange, routing_key=target.routing_key,
                          messages=target.messages, name=name, events=target.events, **how).go()

        if args.warmup:
            for target in targets:
                drive(target, f"{target.name} warm-up", count=args.warmup, window=args.window)
        for round_ in range(1, args.rounds + 1):
            for target in targets:  # the three side by side, alternating, so that the load hits them alike
                if target.key in args.skip:
                    continue
                meter = CpuMeter(lambda t=target: t.server.pids)
                meter.begin()
                run = drive(target, f"{target.name} {round_}", count=args.registrations, window=args.window)
                run.cpu = meter.end()
                run.peak_rss_mb, run.peak_pss_mb = meter.peak_rss_mb, meter.peak_pss_mb
                results[target.key].append(run)
                print(f"({target.key}) round {round_}: {args.registrations / run.elapsed:.0f}/s; {describe(run)}",
                      flush=True)
            latency = [(t, {"a": "b", "c": "d"}.get(t.key)) for t in targets]
            if round_ % 2 == 0:  # (b) and (d) take turns at going first: neither always follows the bursts
                latency.reverse()
            for target, key in latency:
                if key is None or key in args.skip:
                    continue
                time.sleep(args.settle)  # the broker and PostgreSQL finish what the last burst left them
                run = drive(target, f"{target.name} latency {round_}", count=int(args.rate * args.duration),
                            rate=args.rate, timeout=args.duration + 120)
                results[key].append(run)
                print(f"({key}) round {round_}: reply p99 {percentile(run.latencies_ms(), 99):.1f} ms; "
                      f"{describe(run)}", flush=True)
            loads.append(load())
        service_target = next((t for t in targets if t.key == "a"), None)
        if args.backlog and service_target is not None and not args.in_process:
            results["backlog"] = [backlog(service_target, args, drive)]
    finally:
        for server in servers:
            server.stop()
        if not args.keep:
            if not args.vhost:
                try:
                    rabbitmqctl("delete_vhost", vhost)
                except Exception as exc:  # noqa: BLE001
                    print(f"could not delete vhost {vhost}: {exc}", file=sys.stderr)
            if not args.database:
                try:
                    with psycopg.connect(server_db, autocommit=True) as conn:
                        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                                     .format(sql.Identifier(database)))
                except Exception as exc:  # noqa: BLE001
                    print(f"could not drop database {database}: {exc}", file=sys.stderr)

    print_table(args, env, results, loads)
    return 0


def backlog(target: Target, args: argparse.Namespace, drive: Callable[..., Run]) -> Run:
    """The service paused while `--backlog` registrations pile up in its queue, then resumed: its peak resident
    memory while it works them off (its prefetch, not the backlog, should bound it)."""
    meter = CpuMeter(lambda: target.server.pids)
    pids = family(target.server.pids, parents())

    def signal_all(sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    signal_all(signal.SIGSTOP)
    meter.begin()
    try:
        run = drive(target, "backlog", count=args.backlog, window=args.window,
                    on_confirmed=lambda: signal_all(signal.SIGCONT), timeout=args.backlog / 20 + 300)
    finally:
        signal_all(signal.SIGCONT)
    run.cpu = meter.end()
    run.peak_rss_mb, run.peak_pss_mb = meter.peak_rss_mb, meter.peak_pss_mb
    print(f"(backlog) {args.backlog} registrations: peak resident memory {run.peak_rss_mb:.0f} MB (RSS), "
          f"{run.peak_pss_mb:.0f} MB (PSS); {describe(run)}", flush=True)
    return run


def print_table(args: argparse.Namespace, env: dict[str, str], results: dict[str, list[Run]],
                loads: list[str]) -> None:
    settings = " ".join(f"{k}={v}" for k, v in sorted(env.items()))
    how = "in-process" if args.in_process else f"`serve {args.serve_args}`".replace(" `", "`")
    print()
    print(f"Intygstjänsten end to end — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
          f"service {how} ({settings}), documents {args.document_kb} KB, confirm window {args.window}")
    print(f"load average (1, 5, 15 min) before and after each round: {' | '.join(loads)}")
    print(f"{len(results['a'] or results['c'])} alternating rounds; each cell: round by round, then the median")
    rates = {k: [args.registrations / r.elapsed for r in runs] for k, runs in results.items() if k in "ace"}
    ratios: dict[str, list[float]] = {}
    if results["a"] and results["c"]:
        ratios["service / bare loop (c)"] = [c.elapsed / a.elapsed for a, c in zip(results["a"], results["c"])]
    if results["a"] and results["e"]:
        ratios["service / no-database ceiling (e)"] = [e.elapsed / a.elapsed
                                                       for a, e in zip(results["a"], results["e"])]

    def row(label: str, values: list[float], unit: str, digits: int = 0) -> None:
        cells = "  ".join(f"{v:8.{digits}f}" for v in values)
        print(f"{label:44}{cells}   median {median(values):8.{digits}f} {unit}")

    titles = {"a": f"(a) service: {args.registrations} registrations", "c": "(c) bare pika loop (one INSERT each)",
              "e": "(e) pipelined, no database (ceiling)"}
    for key in "ace":
        if rates.get(key):
            row(titles[key], rates[key], "/s")
            per = {g: [r.cpu.get(g, 0) * 1000 / max(1, len(r.replies)) for r in results[key]]
                   for g in ("server", "broker", "postgres", "client")}
            row("    CPU ms per message of the process(es)", per["server"], "ms", 2)
            row("    peak resident memory of the process(es)", [r.peak_rss_mb for r in results[key]], "MB")
            row("    ... as PSS (shared pages counted once)", [r.peak_pss_mb for r in results[key]], "MB")
            print(f"{'':4}median CPU ms per message: broker {median(per['broker']):.2f}, postgres "
                  f"{median(per['postgres']):.2f}, client {median(per['client']):.2f}; other processes "
                  f"{median([r.cpu.get('other', 0) / max(1e-9, r.elapsed) for r in results[key]]):.2f} cores")
    for key, title in (("b", "(b) service"), ("d", "(d) bare loop")):
        if results[key]:
            row(f"{title}: reply p99 at {args.rate:g} msg/s", [percentile(r.latencies_ms(), 99)
                                                                for r in results[key]], "ms", 1)
            row("    reply p50", [percentile(r.latencies_ms(), 50) for r in results[key]], "ms", 1)
    for label, values in ratios.items():
        row(f"ratio {label}", values, "x", 2)
    if results.get("backlog"):
        run = results["backlog"][0]
        print(f"backlog: {args.backlog} registrations queued, then worked off: peak resident memory "
              f"{run.peak_rss_mb:.0f} MB (≤ 250 MB: {'yes' if run.peak_rss_mb <= 250 else 'NO'}); "
              f"as PSS (shared pages counted once) {run.peak_pss_mb:.0f} MB")
    for runs in results.values():
        for run in runs:
            if run.timed_out or run.nacked or len(run.replies) < run.sent:
                print(f"WARNING {run.name}: {describe(run)}")
    verdicts = []
    if "service / bare loop (c)" in ratios:
        verdicts.append(f"≥1.5× bare: {'yes' if median(ratios['service / bare loop (c)']) >= 1.5 else 'NO'}")
    if results["b"]:
        p99 = median([percentile(r.latencies_ms(), 99) for r in results["b"]])
        verdicts.append(f"p99 ≤ 50 ms: {'yes' if p99 <= 50 else 'NO'}")
    if results["a"]:
        cpu = median([r.cpu.get("server", 0) * 1000 / max(1, len(r.replies)) for r in results["a"]])
        verdicts.append(f"service CPU ≤ 0.35 ms/message: {'yes' if cpu <= 0.35 else 'NO'}")
    if "service / no-database ceiling (e)" in ratios:
        verdicts.append(f"moonshot ≥0.8× (e): "
                        f"{'yes' if median(ratios['service / no-database ceiling (e)']) >= 0.8 else 'NO'}")
    if verdicts:
        print("targets (medians): " + ", ".join(verdicts))


if __name__ == "__main__":
    sys.exit(main())
