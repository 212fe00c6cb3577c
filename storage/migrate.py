"""Schema migrations, configured in code so an installed (non-editable) package needs no alembic.ini.

Several service instances may start at once and all call `upgrade`: a transaction-level advisory lock makes them
take turns, and PostgreSQL's transactional DDL means a failed upgrade leaves the schema as it was. Migrations
run without a statement timeout (rewriting a big table may take long) but with a lock timeout, so a migration
stuck behind a running service fails instead of stalling everyone queued behind its own lock.
"""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from storage.engine import make_engine

SCRIPT_LOCATION = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = (3, 0)  # advisory lock namespace 3 (1 = patients, 2 = outbox relay)


def config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
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
    engine = make_engine(database_url, pool_size=1, max_overflow=0, application_name="intygstjanst-migrate")
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision this code knows, so a health check can tell whether the database is behind."""
    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None
    return revision
