"""Per-certificate order and parking in the outbox, erasure of personal data once published, and the indexes that
retention deletes by (issue 6: defects 6, 7, 8).

- `outbox.ordering_key`: the certificate id of an event (NULL for replies); the relay publishes one row per key
  at a time, so one certificate's events never overtake each other, and a failing row holds up only its own key.
- `outbox.retry_at`, `outbox.parked_at`: back-off after a failed attempt; parked after RELAY_MAX_ATTEMPTS.
- `outbox.erase_when_published`: recipient deliveries and every row of a purged certificate are deleted as soon
  as they are published instead of kept for OUTBOX_RETENTION.
- `ix_outbox_failed`: the few rows that failed, which hold up the later rows of their certificate.
- `ix_inbox_handled_at`, `ix_outbox_published_at`: retention finds old rows without scanning the table.

Adding the columns is instant (no table rewrite). The indexes are built in the migration's transaction, which
blocks writes to the table while it runs: on a large inbox (it was never pruned before this revision) build
`ix_inbox_handled_at` beforehand with `CREATE INDEX CONCURRENTLY ix_inbox_handled_at ON inbox (handled_at)` and
this revision skips it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("ordering_key", sa.Text(collation="C"), nullable=True))
    op.add_column("outbox", sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("outbox", sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("outbox", sa.Column("erase_when_published", sa.Boolean(), server_default=sa.text("false"),
                                      nullable=False))
    op.create_index(op.f("ix_outbox_ordering_key"), "outbox", ["ordering_key", "id"],
                    postgresql_where=sa.text("ordering_key IS NOT NULL"))
    op.create_index(op.f("ix_outbox_failed"), "outbox", ["ordering_key", "id"],
                    postgresql_where=sa.text("published_at IS NULL AND retry_at IS NOT NULL"))
    op.create_index(op.f("ix_outbox_published_at"), "outbox", ["published_at"],
                    postgresql_where=sa.text("published_at IS NOT NULL"))
    op.create_index(op.f("ix_inbox_handled_at"), "inbox", ["handled_at"], if_not_exists=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_inbox_handled_at"), table_name="inbox")
    op.drop_index(op.f("ix_outbox_published_at"), table_name="outbox")
    op.drop_index(op.f("ix_outbox_failed"), table_name="outbox")
    op.drop_index(op.f("ix_outbox_ordering_key"), table_name="outbox")
    for column in ("erase_when_published", "parked_at", "retry_at", "ordering_key"):
        op.drop_column("outbox", column)
