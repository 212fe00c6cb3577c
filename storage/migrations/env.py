"""Alembic environment, run by `storage.migrate` (no alembic.ini at runtime).

`storage.migrate` hands over an open connection in `config.attributes["connection"]`, already inside the
transaction that holds the migration lock; the `alembic` command line (for writing new revisions) may instead
set `sqlalchemy.url`, and then we connect ourselves.
"""
from __future__ import annotations

from alembic import context

from storage.tables import metadata

config = context.config


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True,
                      transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from storage.engine import make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url"), statement_timeout_ms=0, pool_size=1)
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata,
                      literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
