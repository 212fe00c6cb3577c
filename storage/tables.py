"""The schema as SQLAlchemy Core tables; `migrations/versions` must create exactly this (a test compares them).

Choices worth knowing:
- Certificate ids use the "C" collation: they are ASCII by contract, and keyset paging compares them, so the
  order must not depend on the server's locale (and "C" compares fastest).
- The document lives in its own table. Lists and most commands never need it; kept apart, the certificates
  heap stays narrow (a small document would otherwise sit inline in every row a list reads) and the document
  is only read by a join when it is returned or delivered. It is `text`, so it comes back byte for byte.
- `content` is the registered JSON without the document, as jsonb: the wire shape is rebuilt from it.
- Indexes follow the queries of CONTRACT §6 (see the comments on each).
"""
from __future__ import annotations

from sqlalchemy import (
    BigInteger, Boolean, CheckConstraint, Column, Date, DateTime, ForeignKey, Index, Integer, LargeBinary,
    MetaData, PrimaryKeyConstraint, String, Table, Text, func, text,
)
from sqlalchemy.dialects.postgresql import CHAR, JSONB

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "%(table_name)s_pkey",
}
metadata = MetaData(naming_convention=NAMING)

CertificateId = Text(collation="C")
Timestamp = DateTime(timezone=True)

certificates = Table(
    "certificates", metadata,
    Column("id", CertificateId, primary_key=True),
    Column("patient_id", CHAR(12), nullable=False),
    Column("type", Text, nullable=False),
    Column("type_version", Text, nullable=True),
    Column("signed_at", Timestamp, nullable=False),
    Column("valid_from", Date, nullable=True),
    Column("valid_to", Date, nullable=True),
    Column("care_unit_id", Text, nullable=False),
    Column("care_giver_id", Text, nullable=False),
    Column("test_certificate", Boolean, nullable=False),
    Column("fingerprint", Text, nullable=True),  # NULL: computed when needed (domain.model, migration 0005)
    Column("content", JSONB, nullable=False),
    Column("available_to_care", Boolean, nullable=False),
    Column("archived", Boolean, nullable=False),
    Column("revoked_at", Timestamp, nullable=True),
    Column("registered_at", Timestamp, nullable=False, server_default=func.now()),
    # certificate.list: equality on patient and archived, then already in newest-first order for the keyset.
    Index("ix_certificates_citizen", "patient_id", "archived", text("signed_at DESC"), text("id DESC")),
    # certificate.list-for-care: only care copies; the unit filter runs on the few rows of one patient.
    Index("ix_certificates_care", "patient_id", "care_giver_id", text("signed_at DESC"), text("id DESC"),
          postgresql_where=text("available_to_care")),
    # care-giver.remove-care-copies: batches in id order.
    Index("ix_certificates_care_giver_copies", "care_giver_id", "id", postgresql_where=text("available_to_care")),
    # consent.set withdrawing: the patient's certificates without a care copy.
    Index("ix_certificates_citizen_only", "patient_id", postgresql_where=text("NOT available_to_care")),
)

certificate_documents = Table(
    "certificate_documents", metadata,
    Column("certificate_id", CertificateId, ForeignKey("certificates.id", ondelete="CASCADE"), primary_key=True),
    Column("media_type", Text, nullable=False),
    Column("encoding", Text, nullable=False),
    Column("content", Text, nullable=False),
)

certificate_statuses = Table(
    "certificate_statuses", metadata,
    Column("certificate_id", CertificateId, ForeignKey("certificates.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("target", Text, nullable=True),
    Column("at", Timestamp, nullable=False),
    PrimaryKeyConstraint("certificate_id", "position"),
)

tombstones = Table(
    "tombstones", metadata,
    Column("certificate_id", CertificateId, primary_key=True),
    Column("purged_at", Timestamp, nullable=False),
    Column("reason", Text, nullable=False),
)

consents = Table(
    "consents", metadata,
    Column("patient_id", CHAR(12), primary_key=True),
    Column("given", Boolean, nullable=False),
    Column("changed_at", Timestamp, nullable=True),
)

inbox = Table(
    "inbox", metadata,
    Column("message_id", String(128), primary_key=True),
    Column("message_type", Text, nullable=False),
    Column("handled_at", Timestamp, nullable=False, server_default=func.now()),
    Column("reply", JSONB, nullable=True),
    CheckConstraint("length(message_id) >= 1", name="message_id_not_empty"),
    # Retention (`storage.retention`): entries older than DEDUP_WINDOW go, oldest first.
    Index("ix_inbox_handled_at", "handled_at"),
)

outbox = Table(
    "outbox", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),  # bigserial: publication order
    Column("kind", Text, nullable=False),
    Column("exchange", Text, nullable=False),
    Column("routing_key", Text, nullable=False),
    Column("message_id", Text, nullable=False),
    Column("correlation_id", Text, nullable=True),
    Column("content_type", Text, nullable=False),
    Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("body", LargeBinary, nullable=False),
    Column("created_at", Timestamp, nullable=False, server_default=func.now()),
    Column("published_at", Timestamp, nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    # Rows with one key (a certificate id; NULL for replies) are published one at a time, in id order.
    Column("ordering_key", CertificateId, nullable=True),
    Column("retry_at", Timestamp, nullable=True),  # after a failed attempt: not again before this
    Column("parked_at", Timestamp, nullable=True),  # failed RELAY_MAX_ATTEMPTS times: skipped until unparked
    # Carries personal data (a recipient delivery, or any row of a purged certificate): deleted once published.
    Column("erase_when_published", Boolean, nullable=False, server_default=text("false")),
    CheckConstraint("kind IN ('reply', 'event')", name="kind"),
    # The relay's batch: the oldest unpublished rows; published ones drop out of the index.
    Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
    # A purge's rows of one certificate.
    Index("ix_outbox_ordering_key", "ordering_key", "id", postgresql_where=text("ordering_key IS NOT NULL")),
    # The few rows that failed and are not yet published: what holds up the later rows of their key.
    Index("ix_outbox_failed", "ordering_key", "id",
          postgresql_where=text("published_at IS NULL AND retry_at IS NOT NULL")),
    # Retention: published rows older than OUTBOX_RETENTION.
    Index("ix_outbox_published_at", "published_at", postgresql_where=text("published_at IS NOT NULL")),
)

bulk_progress = Table(
    "bulk_progress", metadata,
    Column("message_id", String(128), primary_key=True),
    Column("citizen_only", Integer, nullable=False),
    Column("purged", Integer, nullable=False),
    Column("updated_at", Timestamp, nullable=False, server_default=func.now()),
)

# CONTRACT §9: who in care accessed which certificate. Ids only, no foreign key: an entry documents the access
# and outlives the certificate (kept for ACCESS_LOG_RETENTION, whatever happens to the certificate).
access_log = Table(
    "access_log", metadata,
    Column("message_id", String(128), nullable=False),
    Column("certificate_id", CertificateId, nullable=False),
    Column("at", Timestamp, nullable=False),
    Column("action", Text, nullable=False),
    Column("certificate_type", Text, nullable=False),
    Column("patient_id", CHAR(12), nullable=False),
    Column("care_giver_id", Text, nullable=False),
    Column("person_id", Text, nullable=True),  # null only for v1 clients while ACCESS_LOG_REQUIRED is off
    Column("person_name", Text, nullable=True),
    Column("care_unit_id", Text, nullable=True),
    # A redelivered or re-sent message logs nothing twice (INSERT ... ON CONFLICT DO NOTHING on this key).
    PrimaryKeyConstraint("message_id", "certificate_id"),
    CheckConstraint("action IN ('READ', 'LIST', 'REVOKE', 'REMOVE_CARE_COPY', 'SEND')", name="action"),
    # access-log.list: one patient, newest first, in the keyset's order.
    Index("ix_access_log_patient", "patient_id", text("at DESC"), text("message_id DESC"),
          text("certificate_id DESC")),
    # Retention: the oldest entries first, in batches.
    Index("ix_access_log_at", "at"),
)
