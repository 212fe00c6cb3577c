"""The initial schema: certificates with documents and statuses, tombstones, consents, inbox, outbox and the
running totals of a care giver's leaving. Written out by hand so that it never changes with `storage.tables`.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _id() -> sa.Text:
    return sa.Text(collation="C")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "certificates",
        sa.Column("id", _id(), nullable=False),
        sa.Column("patient_id", postgresql.CHAR(12), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("type_version", sa.Text(), nullable=True),
        sa.Column("signed_at", _ts(), nullable=False),
        sa.Column("valid_from", sa.Date(), nullable=True),
        sa.Column("valid_to", sa.Date(), nullable=True),
        sa.Column("care_unit_id", sa.Text(), nullable=False),
        sa.Column("care_giver_id", sa.Text(), nullable=False),
        sa.Column("test_certificate", sa.Boolean(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("content", postgresql.JSONB(), nullable=False),
        sa.Column("available_to_care", sa.Boolean(), nullable=False),
        sa.Column("archived", sa.Boolean(), nullable=False),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.Column("registered_at", _ts(), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("certificates_pkey")),
    )
    op.create_index(op.f("ix_certificates_citizen"), "certificates",
                    ["patient_id", "archived", sa.text("signed_at DESC"), sa.text("id DESC")])
    op.create_index(op.f("ix_certificates_care"), "certificates",
                    ["patient_id", "care_giver_id", sa.text("signed_at DESC"), sa.text("id DESC")],
                    postgresql_where=sa.text("available_to_care"))
    op.create_index(op.f("ix_certificates_care_giver_copies"), "certificates", ["care_giver_id", "id"],
                    postgresql_where=sa.text("available_to_care"))
    op.create_index(op.f("ix_certificates_citizen_only"), "certificates", ["patient_id"],
                    postgresql_where=sa.text("NOT available_to_care"))

    op.create_table(
        "certificate_documents",
        sa.Column("certificate_id", _id(), nullable=False),
        sa.Column("media_type", sa.Text(), nullable=False),
        sa.Column("encoding", sa.Text(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["certificate_id"], ["certificates.id"], ondelete="CASCADE",
                                name=op.f("fk_certificate_documents_certificate_id")),
        sa.PrimaryKeyConstraint("certificate_id", name=op.f("certificate_documents_pkey")),
    )

    op.create_table(
        "certificate_statuses",
        sa.Column("certificate_id", _id(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("at", _ts(), nullable=False),
        sa.ForeignKeyConstraint(["certificate_id"], ["certificates.id"], ondelete="CASCADE",
                                name=op.f("fk_certificate_statuses_certificate_id")),
        sa.PrimaryKeyConstraint("certificate_id", "position", name=op.f("certificate_statuses_pkey")),
    )

    op.create_table(
        "tombstones",
        sa.Column("certificate_id", _id(), nullable=False),
        sa.Column("purged_at", _ts(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("certificate_id", name=op.f("tombstones_pkey")),
    )

    op.create_table(
        "consents",
        sa.Column("patient_id", postgresql.CHAR(12), nullable=False),
        sa.Column("given", sa.Boolean(), nullable=False),
        sa.Column("changed_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("patient_id", name=op.f("consents_pkey")),
    )

    op.create_table(
        "inbox",
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("message_type", sa.Text(), nullable=False),
        sa.Column("handled_at", _ts(), server_default=sa.text("now()"), nullable=False),
        sa.Column("reply", postgresql.JSONB(), nullable=True),
        sa.CheckConstraint("length(message_id) >= 1", name=op.f("ck_inbox_message_id_not_empty")),
        sa.PrimaryKeyConstraint("message_id", name=op.f("inbox_pkey")),
    )

    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),  # bigserial
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("exchange", sa.Text(), nullable=False),
        sa.Column("routing_key", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("headers", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _ts(), server_default=sa.text("now()"), nullable=False),
        sa.Column("published_at", _ts(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint("kind IN ('reply', 'event')", name=op.f("ck_outbox_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("outbox_pkey")),
    )
    op.create_index(op.f("ix_outbox_unpublished"), "outbox", ["id"], postgresql_where=sa.text("published_at IS NULL"))

    op.create_table(
        "bulk_progress",
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("citizen_only", sa.Integer(), nullable=False),
        sa.Column("purged", sa.Integer(), nullable=False),
        sa.Column("updated_at", _ts(), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("message_id", name=op.f("bulk_progress_pkey")),
    )


def downgrade() -> None:
    for table in ("bulk_progress", "outbox", "inbox", "consents", "tombstones", "certificate_statuses",
                  "certificate_documents", "certificates"):
        op.drop_table(table)
