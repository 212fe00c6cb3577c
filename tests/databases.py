"""Throw-away databases next to the session's `database_url`, for test modules that need their own (to migrate
from empty, or so that other modules' rows never show up in a list or a count)."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from storage import migrate
from storage.engine import make_engine
from storage.tables import metadata

ALL_TABLES = ", ".join(t.name for t in metadata.sorted_tables)


class FreshDatabase:
    """CREATE DATABASE next to `database_url`; dropped (FORCE) on exit. `with FreshDatabase(url, "x") as url:`"""

    def __init__(self, database_url: str, suffix: str) -> None:
        self.server = make_url(database_url)
        self.name = f"{self.server.database}_{suffix}_{uuid.uuid4().hex[:6]}"
        self.url = self.server.set(database=self.name).render_as_string(hide_password=False)

    def _admin(self, sql: str) -> None:
        with psycopg.connect(self.server.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(sql)

    def __enter__(self) -> str:
        self._admin(f'CREATE DATABASE "{self.name}"')
        return self.url

    def __exit__(self, *exc: object) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@contextmanager
def migrated_database(database_url: str, suffix: str) -> Iterator[str]:
    """A fresh database next to `database_url`, migrated to the newest revision, dropped on exit."""
    with FreshDatabase(database_url, suffix) as url:
        migrate.upgrade(url)
        yield url


@contextmanager
def migrated_engine(database_url: str, suffix: str, **engine_options: object) -> Iterator[Engine]:
    """An engine (`make_engine(url, **engine_options)`) on a `migrated_database`; disposed of, and the database
    dropped, on exit."""
    with migrated_database(database_url, suffix) as url:
        engine = make_engine(url, **engine_options)
        try:
            yield engine
        finally:
            engine.dispose()


def empty_tables(engine: Engine, tables: str = ALL_TABLES) -> None:
    """TRUNCATE `tables` (default: every table of the schema) and restart their sequences: a test sees only its
    own rows, and its outbox ids start at 1."""
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY"))
