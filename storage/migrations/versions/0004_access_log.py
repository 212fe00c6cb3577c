"""The access log of care staff's reads (CONTRACT §9): one row per certificate a care message touched, ids only,
no foreign key (an entry outlives the certificate it documents).

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "access_log",
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("certificate_id", sa.Text(collation="C"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("certificate_type", sa.Text(), nullable=False),
        sa.Column("patient_id", postgresql.CHAR(12), nullable=False),
        sa.Column("care_giver_id", sa.Text(), nullable=False),
        sa.Column("person_id", sa.Text(), nullable=True),
        sa.Column("person_name", sa.Text(), nullable=True),
        sa.Column("care_unit_id", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("message_id", "certificate_id", name=op.f("access_log_pkey")),
        sa.CheckConstraint("action IN ('READ', 'LIST', 'REVOKE', 'REMOVE_CARE_COPY', 'SEND')",
                           name=op.f("ck_access_log_action")),
    )
    op.create_index(op.f("ix_access_log_patient"), "access_log",
                    ["patient_id", sa.text("at DESC"), sa.text("message_id DESC"), sa.text("certificate_id DESC")])
    op.create_index(op.f("ix_access_log_at"), "access_log", ["at"])


def downgrade() -> None:
    op.drop_table("access_log")
