"""Compress large values with lz4 instead of pglz: the document (about 20 KB, always TOASTed) and the outbox body
(a recipient delivery carries the whole certificate). pglz cost about 0.5 ms per 20 KB document on insert, more
than everything else a registration writes together; lz4 takes about a quarter of that and compresses as well.

Only the compression of values written from now on changes (no table rewrite; old values stay readable). A server
built without lz4 (or older than PostgreSQL 14) keeps pglz: the schema is the same either way.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""
from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = (("certificate_documents", "content"), ("outbox", "body"))


def _set_compression(method: str) -> None:
    for table, column in COLUMNS:
        op.execute(f"""
            DO $$
            BEGIN
                IF current_setting('server_version_num')::int >= 140000 THEN
                    EXECUTE 'ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}';
                END IF;
            EXCEPTION WHEN feature_not_supported THEN
                NULL;  -- built without lz4: keep the default
            END $$""")


def upgrade() -> None:
    _set_compression("lz4")


def downgrade() -> None:
    _set_compression("pglz")
