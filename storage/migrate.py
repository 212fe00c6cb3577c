"""Schema migrations, configured in code so an installed (non-editable) package needs no alembic.ini.

Several service instances may start at once and all call `upgrade`: a transaction-level advisory lock makes them
take turns, and PostgreSQL's transactional DDL means a failed upgrade leaves the schema as it was. Migrations
run without a statement timeout (rewriting a big table may take long) but with a lock timeout, so a migration
stuck behind a running service fails instead of stalling everyone queued behind its own lock.

Alembic is imported only by what migrates or reads the database's revision (a short-lived process at start-up,
the command line): `head()`, which every running service's readiness probe needs, reads the revision files
themselves, so the long-running processes do without Alembic's memory.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, text

from storage.engine import make_engine

if TYPE_CHECKING:
    from alembic.config import Config

SCRIPT_LOCATION = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = (3, 0)  # advisory lock namespace 3 (1 = patients, 2 = outbox relay)


def config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    from alembic import command

    engine = make_engine(database_url, pool_size=1, max_overflow=0, statement_timeout_ms=0,
                         lock_timeout_ms=60_000, application_name="intygstjanst-migrate")
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": MIGRATION_LOCK[0], "b": MIGRATION_LOCK[1]})
            command.upgrade(config(conn), revision)
    finally:
        engine.dispose()


def current(database_url: str) -> str | None:
    """The revision the database is at; None for an empty (never migrated) database."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(database_url, pool_size=1, max_overflow=0, application_name="intygstjanst-migrate")
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head(versions: Path = SCRIPT_LOCATION / "versions") -> str:
    """The newest revision this code knows, so a health check can tell whether the database is behind: the one
    revision no other revision revises (read from the files' `revision` and `down_revision`, as Alembic does)."""
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in versions.glob("*.py"):
        constants = _constants(path)
        revisions.add(constants["revision"])
        down = constants.get("down_revision")  # None, a revision, or several (a merge)
        revised.update([down] if isinstance(down, str) else down or ())
    heads = revisions - revised
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads ({', '.join(sorted(heads))}); merge them")
    return heads.pop()


def _constants(path: Path) -> dict[str, Any]:
    """A revision file's `revision` and `down_revision`, plain (`revision = "0001"`) or annotated as the template
    writes them (`revision: str = "0005"`)."""
    found: dict[str, Any] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
            found[target.id] = ast.literal_eval(value)
    return found
