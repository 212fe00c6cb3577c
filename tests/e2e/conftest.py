"""Fixtures of the end-to-end tests: every test gets its own RabbitMQ vhost and PostgreSQL database (so dead-letter
queues, recipient queues and tables hold only what the test did), and starts the real service as a subprocess.

- `stack`: the vhost + database (`stack.amqp_url`, `stack.database_url`, `stack.db`, `stack.grant(user)`).
- `launch(**settings)`: start `intygstjanst serve` against `stack` (settings as env vars, fast retries by
  default) and wait until it consumes. At teardown every process still running is stopped with SIGTERM and must
  exit 0; when the test failed, the tail of every service log is printed.
- `wire`: a `harness.Wire` on the test's vhost (commands, replies, an `intyg.events` tap, queues).
- `module_stack`, `module_launch`: the same for a whole module that shares one running service.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

try:
    from tests import services
    from tests.e2e.harness import Db, ServiceProcess, Wire, service_env
except ImportError:  # tests/ itself on sys.path
    import services
    from e2e.harness import Db, ServiceProcess, Wire, service_env

# Fast enough that retries, the revoke window and reconnects fit in a test.
FAST: dict[str, Any] = {
    "RETRY_DELAYS_S": [0.2, 0.4],
    "REVOKE_WAIT_S": 2,
    "RECONNECT_MAX_S": 1,
    "RELAY_POLL_S": 0.05,
    "LOG_LEVEL": "INFO",
    "METRICS_PORT": 0,  # tests run side by side: the ones about the endpoints give a free port
}


@dataclass
class Stack:
    amqp_url: str
    database_url: str
    vhost: str
    broker: Any
    db: Db = field(init=False)

    def __post_init__(self) -> None:
        self.db = Db(self.database_url)

    def grant(self, user: str, password: str) -> str:
        """Give an existing broker user full rights on this vhost; returns its AMQP URL here."""
        self.broker.admin.grant_all(self.vhost, user)
        return self.broker.target.url(vhost=self.vhost, user=user, password=password)

    def url_via(self, host: str, port: int, *, database: bool = False) -> str:
        """This stack's AMQP (or database) URL with the host and port replaced (to go through a proxy)."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.database_url if database else self.amqp_url)
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{userinfo}{host}:{port}"))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@contextmanager
def _new_stack(broker: Any, postgres_server_url: str) -> Iterator[Stack]:
    suffix = services.run_id()
    vhost = f"intyg-e2e-{suffix}"
    broker.admin.add_vhost(vhost)
    database = f"intyg_e2e_{suffix}"
    try:
        broker.admin.grant_all(vhost, broker.target.user)
        amqp_url = broker.target.url(vhost=vhost)
        services.wait_for_vhost(amqp_url)
        database_url = services.create_database(postgres_server_url, database)
        yield Stack(amqp_url, database_url, vhost, broker)
    finally:
        try:
            services.drop_database(postgres_server_url, database)
        finally:
            broker.admin.delete_vhost(vhost)


@pytest.fixture
def stack(_rabbitmq_broker, _postgres_server_url) -> Iterator[Stack]:
    with _new_stack(_rabbitmq_broker, _postgres_server_url) as s:
        yield s


@pytest.fixture(scope="module")
def module_stack(_rabbitmq_broker, _postgres_server_url) -> Iterator[Stack]:
    """One vhost and database for every test of a module (for a service the whole module shares)."""
    with _new_stack(_rabbitmq_broker, _postgres_server_url) as s:
        yield s


class Launcher:
    def __init__(self, stack: Stack, tmp_path: Path) -> None:
        self.stack = stack
        self.tmp_path = tmp_path
        self.processes: list[ServiceProcess] = []

    def __call__(self, *args: str, ready: bool = True, **settings: Any) -> ServiceProcess:
        """`serve ARGS` with `settings` (as environment variables) over the stack's and FAST's."""
        merged = {"AMQP_URL": self.stack.amqp_url, "DATABASE_URL": self.stack.database_url, **FAST,
                  **{k.upper(): v for k, v in settings.items()}}
        log = self.tmp_path / f"service-{len(self.processes) + 1}.log"
        process = ServiceProcess(service_env(**merged), log, args)
        self.processes.append(process)
        return process.start(ready=ready)


def _stop_all(launcher: Launcher, *, show_logs: bool) -> None:
    """SIGTERM every process still running (each must exit 0); print the tail of every log when asked or when one
    did not stop cleanly."""
    problems = []
    for n, process in enumerate(launcher.processes, 1):
        if process.running:
            code = process.terminate()
            if code != 0:
                problems.append(f"service #{n} exited with {code} after SIGTERM")
    if problems or show_logs:
        for n, process in enumerate(launcher.processes, 1):
            lines = process.log_text().splitlines()
            print(f"\n===== service #{n} log ({process.log_path}, exit {process.returncode}, "
                  f"last {min(300, len(lines))} of {len(lines)} lines) =====")
            print("\n".join(lines[-300:]))
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def launch(stack: Stack, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Launcher]:
    launcher = Launcher(stack, tmp_path)
    yield launcher
    report = getattr(request.node, "rep_call", None)
    _stop_all(launcher, show_logs=report is None or report.failed)


@pytest.fixture(scope="module")
def module_launch(module_stack: Stack, tmp_path_factory: pytest.TempPathFactory,
                  request: pytest.FixtureRequest) -> Iterator[Launcher]:
    launcher = Launcher(module_stack, tmp_path_factory.mktemp("service"))
    failed_before = request.session.testsfailed
    yield launcher
    _stop_all(launcher, show_logs=request.session.testsfailed > failed_before)


@pytest.fixture
def wire(stack: Stack) -> Iterator[Wire]:
    w = Wire(stack.amqp_url)
    yield w
    w.close()
