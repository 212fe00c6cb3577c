"""`intygstjanst serve`: the service as a small family of processes, so that it uses more than one core (one
Python interpreter runs one thread at a time).

The supervisor (this process) has the database migrated and the topology declared once (by a short-lived child,
so that the supervisor itself stays small), then starts its children:
one outbox relay and `CONSUMER_PROCESSES` consumer processes (the first consumes every queue; the others only
the order-free intyg.registration and intyg.query, so that the ordered queues keep one consumer). The relay hears
the consumers' commits through PostgreSQL NOTIFY (`publishers.wakeup`). It logs `service started` once every child
has said it is ready.

- A child that dies is started again after a capped, jittered back-off (logged). A child that keeps dying soon
  after its start (`GIVE_UP_AFTER` times in a row) cannot be kept alive: everything stops, exit code 1.
- SIGTERM/SIGINT: the consumers get SIGTERM first (they finish and acknowledge their batches and exit), then the
  relay (it publishes what they committed and exits); exit code 0 when every child exited 0.
- Children die with the supervisor, even when it is SIGKILLed: each child asks Linux for SIGTERM when its
  parent dies (`prctl(PR_SET_PDEATHSIG)`). Children run in their own process group, so a terminal's Ctrl-C
  reaches only the supervisor, which stops them in order.

`serve` hands over to the supervisor by replacing its own process image (`become_supervisor`: `os.execv` of
`python -m service.supervisor`, the same pid, so signals and the exit code are the supervisor's): the command
line's libraries (typer, rich, pydantic, SQLAlchemy, ...) are not kept in memory for the lifetime of the service.
The supervisor and its children are this module run as `__main__`.

`serve --single-process` keeps everything in one process (threads), as `--no-relay` and `--relay-only` do.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":
    # structlog imports rich whenever it is installed (for a console renderer these processes never use: they log
    # JSON); rich is the command line's, and it would cost every process of the family about 4 MB.
    sys.modules.setdefault("rich", None)  # type: ignore[assignment]

import argparse
import ctypes
import json
import os
import random
import secrets
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NoReturn

from contracts.topology import CONSUMED_QUEUES
from service.family_probes import FamilyProbes, free_port, port_free
from service.linelog import LineLogger

# The supervisor imports little (no pika, SQLAlchemy, Alembic, pydantic): it holds no connection and its resident
# memory counts against the service's. The migration and the topology run in a short-lived child (PREPARE).
# What it reads of the settings, handed over by `serve`, which validated them all:
HANDED_OVER = ("consumer_processes", "metrics_port", "reconnect_max_s", "log_level")
PREPARE, RELAY, CONSUMERS, ORDER_FREE = "prepare", "relay", "consumers", "order-free"
GIVE_UP_AFTER = 5  # deaths in a row, each within STABLE_S of its start
STABLE_S = 30.0  # a child that lived this long counts as kept alive
POLL_S = 0.2
CONSUMERS_STOP_S = 35.0  # in-flight batches finish, then the connection closes
RELAY_STOP_S = 15.0  # the relay flushes for at most 10 s (service.app)
PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    role: str
    number: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None  # read end of the pipe the child writes one byte to when it is ready
    started_at: float = 0.0
    ready: bool = False
    quick_deaths: int = 0
    restart_at: float | None = None
    backoff_cap_s: float = 30.0
    metrics_port: int = 0  # its private `service.probes` port (0: none), which the family's port answers from

    def next_delay(self) -> float:
        """Capped exponential back-off, jittered (between half and all of it), by deaths in a row."""
        nominal = min(self.backoff_cap_s, 0.5 * 2 ** (self.quick_deaths - 1))
        return random.uniform(nominal / 2, nominal)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.number}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def roles(consumer_processes: int) -> list[str]:
    return [RELAY, CONSUMERS, *[ORDER_FREE] * (max(1, consumer_processes) - 1)]


class Supervisor:
    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.log = LineLogger("intygstjanst.supervisor", settings.log_level)
        self.children = [Child(role, n, backoff_cap_s=settings.reconnect_max_s)
                         for n, role in enumerate(roles(settings.consumer_processes), 1)]
        self._stopping = False
        self._announced = False
        self._probes: Any = None
        # One log salt for the whole family, so that patient hashes correlate across its processes.
        self._child_env = {**os.environ, "LOG_SALT": settings.log_salt or secrets.token_hex(16)}

    # -- run ---------------------------------------------------------------------------------------------------

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        port = self.settings.metrics_port
        if port and (busy := port_free(port)) is not None:
            self._no_endpoints(port, busy)
            port = 0
        try:
            prepared = self._prepare(port)
            if self._stopping:
                return 0
            if not prepared:
                return 1
            if port:
                self._probes = FamilyProbes(port, lambda: [(c.name, c.metrics_port if c.alive else None)
                                                           for c in self.children])
                if (busy := self._probes.start()) is not None:
                    self._no_endpoints(port, busy)
                    self._probes = None
            for child in self.children:
                child.metrics_port = free_port() if self._probes is not None else 0
                self._spawn(child)
            kept_alive = self._watch()
            clean = self._stop_children()
            self.log.info("service stopped", clean=clean)
            return 0 if kept_alive and clean else 1
        finally:
            if self._probes is not None:
                self._probes.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.log.info("signal received; stopping", signal=signal.Signals(signum).name)
        self._stopping = True

    def _no_endpoints(self, port: int, why: OSError) -> None:
        self.log.warning(f"metrics and health endpoints off: cannot listen on port {port} "
                         f"({why.strerror or why}); the service runs on without them", port=port)

    def _prepare(self, port: int) -> bool:
        """Migrate and declare the topology in a child (it waits for a database or broker that is not up yet, and
        meanwhile answers the probes on the family's port: alive, not ready)."""
        child = Child(PREPARE, 0, metrics_port=port)
        self._spawn(child)
        while child.proc.poll() is None:
            if self._stopping:
                child.proc.send_signal(signal.SIGTERM)
                child.proc.wait()
                break
            time.sleep(POLL_S)
        self._close_pipe(child)
        if child.proc.returncode != 0 and not self._stopping:
            self.log.error("could not migrate the database or declare the topology; stopping",
                           exit_code=child.proc.returncode)
            return False
        return True

    def _spawn(self, child: Child) -> None:
        read_fd, write_fd = os.pipe()
        command = [sys.executable, "-m", "service.supervisor", "--role", child.role, "--ready-fd", str(write_fd),
                   "--parent", str(os.getpid())]
        try:
            child.proc = subprocess.Popen(command, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, process_group=0,
                                          env={**self._child_env, "METRICS_PORT": str(child.metrics_port)})
        finally:
            os.close(write_fd)
        child.ready_fd, child.started_at, child.ready, child.restart_at = read_fd, time.monotonic(), False, None
        self.log.info("child started", child=child.name, pid=child.proc.pid)

    def _watch(self) -> bool:
        """Until a signal (True) or a child that cannot be kept alive (False)."""
        while not self._stopping:
            fds = [c.ready_fd for c in self.children if c.ready_fd is not None and not c.ready]
            readable = select.select(fds, [], [], POLL_S)[0]
            for child in self.children:
                if child.ready_fd in readable:
                    self._on_ready(child)
            now = time.monotonic()
            for child in self.children:
                if child.proc is not None and not child.alive and not self._stopping:
                    if not self._on_death(child, now):
                        return False
                if child.restart_at is not None and now >= child.restart_at and not self._stopping:
                    self._spawn(child)
        return True

    def _on_ready(self, child: Child) -> None:
        if os.read(child.ready_fd, 1):  # b"" is the child exiting before it was ready
            child.ready = True
            self.log.info("child ready", child=child.name, pid=child.proc.pid)
            if not self._announced and all(c.ready for c in self.children):
                self._announced = True
                self.log.info("service started", processes=[c.name for c in self.children],
                              consumer_processes=self.settings.consumer_processes)
        self._close_pipe(child)

    def _on_death(self, child: Child, now: float) -> bool:
        code = child.proc.returncode
        lived = now - child.started_at
        child.proc = None
        self._close_pipe(child)
        child.ready = False
        if lived >= STABLE_S:
            child.quick_deaths = 0
        child.quick_deaths += 1
        if child.quick_deaths >= GIVE_UP_AFTER:
            self.log.error("child cannot be kept alive; stopping the service", child=child.name, exit_code=code,
                           deaths=child.quick_deaths)
            return False
        delay = child.next_delay()
        child.restart_at = now + delay
        self.log.error(f"child died; restarting it in {delay:.1f}s", child=child.name, exit_code=code,
                       lived_s=round(lived, 1), deaths=child.quick_deaths)
        return True

    def _close_pipe(self, child: Child) -> None:
        if child.ready_fd is not None:
            os.close(child.ready_fd)
            child.ready_fd = None

    # -- stop --------------------------------------------------------------------------------------------------

    def _stop_children(self) -> bool:
        """Consumers first, then the relay (it publishes what they committed last). True if every child exited 0
        on its SIGTERM."""
        clean = True
        for group, timeout in (([c for c in self.children if c.role != RELAY], CONSUMERS_STOP_S),
                               ([c for c in self.children if c.role == RELAY], RELAY_STOP_S)):
            running = [c for c in group if c.alive]
            for child in running:
                child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for child in running:
                try:
                    code = child.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.log.error("child did not stop in time; killed", child=child.name)
                    child.proc.kill()
                    code = child.proc.wait()
                if code == -signal.SIGTERM and not child.ready:
                    # Still starting (restarted a moment ago): it had not yet installed the handler that stops it
                    # cleanly, nor started any work; our SIGTERM ended it as asked.
                    self.log.info("child stopped while it was starting", child=child.name)
                elif code != 0:
                    self.log.error("child stopped with an error", child=child.name, exit_code=code)
                    clean = False
            for child in group:
                self._close_pipe(child)
        return clean


# -- the supervisor's process ------------------------------------------------------------------------------------


def become_supervisor(settings: Any) -> NoReturn:
    """Replace this process (`serve`, with the command line's libraries loaded) by the supervisor: the same pid,
    the settings it needs as an argument, the log salt (a secret: not on a command line) in the environment."""
    if settings.log_salt:
        os.environ["LOG_SALT"] = settings.log_salt
    handed = json.dumps({name: getattr(settings, name) for name in HANDED_OVER})
    sys.stdout.flush()  # execv discards what is still buffered
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "service.supervisor", "--settings", handed])


def supervisor_main(handed: dict[str, Any]) -> int:
    settings = SimpleNamespace(**handed, log_salt=os.environ.get("LOG_SALT", ""))
    return Supervisor(settings).run()


# -- a child ---------------------------------------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """SIGTERM this process when the supervisor dies, however it dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it died before the prctl
        raise SystemExit(0)


def child_queues(role: str) -> Sequence[str]:
    from consumers.loop import ORDER_FREE_QUEUES

    if role == ORDER_FREE:
        return [q for q in CONSUMED_QUEUES if q in ORDER_FREE_QUEUES]
    return CONSUMED_QUEUES


def child_main(args: argparse.Namespace) -> int:
    _die_with(args.parent)

    from service.app import Service, StartupAborted
    from service.logging import configure
    from service.settings import Settings

    settings = Settings()
    configure(settings.log_level, salt=settings.log_salt or None)
    if args.role == PREPARE:
        preparer = Service(settings)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: preparer.request_stop())
        preparer.start_probes()
        try:
            preparer.prepare()
        except StartupAborted:
            pass
        finally:
            if preparer.probes is not None:
                preparer.probes.stop()
        return 0

    def ready() -> None:
        os.write(args.ready_fd, b"1")
        os.close(args.ready_fd)

    relay = args.role == RELAY
    service = Service(settings, consumers=not relay, relay=relay, queues=None if relay else child_queues(args.role),
                      migrate_db=False, declare_topology=False, ready_line=f"{args.role} process ready")
    return service.run(on_ready=ready)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.supervisor",
                                     description="`intygstjanst serve`'s processes: the supervisor (--settings, "
                                                 "from `serve`) or one of its children (--role)")
    parser.add_argument("--settings", type=json.loads, help="the supervisor's settings, as JSON")
    parser.add_argument("--role", choices=[PREPARE, RELAY, CONSUMERS, ORDER_FREE])
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--parent", type=int)
    args = parser.parse_args(argv)
    if args.role is None:
        if args.settings is None:
            parser.error("--settings or --role is required")
        return supervisor_main(args.settings)
    if args.ready_fd is None or args.parent is None:
        parser.error("a child needs --ready-fd and --parent")
    return child_main(args)


if __name__ == "__main__":
    sys.exit(main())
