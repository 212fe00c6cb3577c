"""Resident memory of an idle `serve`, process by process: RSS and PSS (proportional: a page shared by N processes
counts 1/N in each, so the PSS column adds up to what the family really holds).

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        python benchmarks/memory.py --env CONSUMER_PROCESSES=2
    python benchmarks/memory.py --service-root /tmp/before     # an older checkout (`git worktree add`)

Creates a vhost and a database of its own (as benchmarks/throughput.py does), starts `python -m service.cli serve`
against them, waits for `service started` in its log and `--settle` seconds more, prints the figures, stops the
service and removes the vhost and the database. It prints figures; it is not a test.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pika
import psycopg
from psycopg import sql

from throughput import ROOT, family, parents, plain, rabbitmqctl, with_database, with_vhost


def rollup(pid: int) -> dict[str, int]:
    """Rss, Pss and the private pages (Private_Clean + Private_Dirty: what its end would free), in KB."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in f if line.rstrip().endswith("kB")}
    return {"rss": kb["Rss"], "pss": kb["Pss"], "private": kb["Private_Clean"] + kb["Private_Dirty"]}


def role(pid: int, root: int) -> str:
    if pid == root:
        return "supervisor"
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    return argv[argv.index("--role") + 1] if "--role" in argv else " ".join(argv)[:40]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    parser.add_argument("--database-url",
                        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the service, e.g. CONSUMER_PROCESSES=2 (repeatable)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait after `service started` (5)")
    parser.add_argument("--service-root", type=Path, default=ROOT, help="run the service from this checkout")
    args = parser.parse_args(argv)

    tag = uuid.uuid4().hex[:8]
    vhost, database, server_db = f"intyg-bench-{tag}", f"intyg_bench_{tag}", plain(args.database_url)
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, pika.URLParameters(args.amqp_url).credentials.username,
                ".*", ".*", ".*")
    with psycopg.connect(server_db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    log_path = Path(tempfile.mkdtemp(prefix="intyg-memory-")) / "service.log"
    env = {**os.environ, "AMQP_URL": with_vhost(args.amqp_url, vhost), "LOG_LEVEL": "INFO",
           "DATABASE_URL": with_database(server_db, database), "PYTHONPATH": str(args.service_root),
           **dict(item.split("=", 1) for item in args.env)}
    try:
        with open(log_path, "w") as log:
            service = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=args.service_root,
                                       env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while '"service started"' not in log_path.read_text():
                if service.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"serve did not start; see {log_path}")
                time.sleep(0.2)
            time.sleep(args.settle)
            figures = [(role(pid, service.pid), pid, rollup(pid))
                       for pid in sorted(family({service.pid}, parents()))]
        finally:
            service.terminate()
            service.wait(60)
    finally:
        rabbitmqctl("delete_vhost", vhost)
        with psycopg.connect(server_db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))

    print(f"`serve` from {args.service_root} ({' '.join(args.env)}), {args.settle:g}s after `service started`")
    print(f"{'process':12} {'pid':>8} {'RSS MB':>8} {'PSS MB':>8} {'private MB':>11}")
    for name, pid, kb in figures:
        print(f"{name:12} {pid:8} {kb['rss'] / 1024:8.1f} {kb['pss'] / 1024:8.1f} "
              f"{kb['private'] / 1024:11.1f}")
    total = {k: sum(kb[k] for _name, _pid, kb in figures) / 1024 for k in ("rss", "pss", "private")}
    print(f"{'total':12} {'':8} {total['rss']:8.1f} {total['pss']:8.1f} {total['private']:11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
