"""The processes of `serve` load only what they run (their resident memory is the service's, issue 10): the
supervisor no database, broker, settings, metrics, structlog or command line library; the relay and consumer processes
neither Alembic (only the short-lived process that migrates does), nor the command line's typer and rich, nor
OpenTelemetry while tracing is off; the relay's process not the message loop. Each is checked in a fresh
interpreter entered as `serve`'s processes are (`python -m service.supervisor`), with no server to talk to.
Their readiness probe needs the code's newest migration without Alembic: `storage.migrate.head()` reads it from
the revision files, and says what Alembic says."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from storage import migrate

REPO = Path(__file__).resolve().parents[2]
NOWHERE = {"AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F", "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x",
           "RECONNECT_MAX_S": "1"}
COMMAND_LINE_AND_TOOLS = {"alembic", "mako", "typer", "click", "rich", "pygments", "opentelemetry"}

# The entry point of every process of `serve`, then (for a child) the Service that `child_main` builds.
ENTRY = """
import runpy, sys
sys.argv = ["service.supervisor", "--help"]
try:
    runpy.run_module("service.supervisor", run_name="__main__")
except SystemExit:
    pass
"""
CHILD = ENTRY + """
from service.app import Service
from service.settings import Settings
service = Service(Settings(), consumers={consumers}, relay={relay}, migrate_db=False, declare_topology=False)
service.start_probes()
service.start(ready_timeout=0)
"""
REPORT = """
import os
with open({report!r}, "w") as report:  # not stdout, where its threads log
    report.write(" ".join(name for name, module in sys.modules.items() if module is not None))
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def modules_of(code: str, tmp_path: Path) -> set[str]:
    """Every module a fresh interpreter has loaded after `code` (not one it refused to load, which `sys.modules`
    holds as None; no OTEL_* variable: tracing off)."""
    report = tmp_path / "modules"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code + REPORT.format(report=str(report))], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**env, **NOWHERE, "METRICS_PORT": str(free_port())})
    assert report.exists(), done.stdout + done.stderr
    return set(report.read_text().split())


def packages(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_the_supervisor_loads_no_database_broker_settings_metrics_structlog_or_command_line_library(tmp_path):
    loaded = packages(modules_of(ENTRY, tmp_path))
    assert loaded & {"sqlalchemy", "psycopg", "pika", "pydantic", "pydantic_settings", "prometheus_client",
                     "structlog", "asyncio", *COMMAND_LINE_AND_TOOLS} == set()


@pytest.mark.parametrize("consumers, relay", [(False, True), (True, False)], ids=["relay", "consumers"])
def test_a_relay_or_consumer_process_loads_no_migration_tool_command_line_or_tracing(consumers, relay, tmp_path):
    loaded = modules_of(CHILD.format(consumers=consumers, relay=relay), tmp_path)
    assert {"sqlalchemy", "prometheus_client"} <= packages(loaded)  # it did build its service
    assert packages(loaded) & COMMAND_LINE_AND_TOOLS == set()
    assert ("consumers.loop" in loaded) == consumers


def test_the_head_revision_read_from_the_migration_files_is_alembics():
    assert migrate.head() == ScriptDirectory.from_config(migrate.config()).get_current_head()


def test_the_head_revision_is_read_from_files_as_the_revision_template_writes_them(tmp_path):
    (tmp_path / "0001_first.py").write_text('revision = "0001"\ndown_revision = None\n')
    (tmp_path / "0002_next.py").write_text('revision: str = "0002"\ndown_revision: str | None = "0001"\n')
    assert migrate.head(tmp_path) == "0002"
    (tmp_path / "0003_branch.py").write_text('revision: str = "0003"\ndown_revision: str | None = "0001"\n')
    with pytest.raises(RuntimeError, match="2 heads"):
        migrate.head(tmp_path)
    (tmp_path / "0004_merge.py").write_text('revision: str = "0004"\ndown_revision = ("0002", "0003")\n')
    assert migrate.head(tmp_path) == "0004"


def test_a_started_process_keeps_what_it_loaded_out_of_the_collectors_sight():
    code = ("import gc, service.app\n"
            "before = gc.get_freeze_count()\n"
            "service.app.settle_heap()\n"
            "print(before, gc.get_freeze_count(), len(gc.get_objects()))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    before, frozen, watched = map(int, out.split())
    assert before == 0 and frozen > 10_000 and watched < frozen / 10
