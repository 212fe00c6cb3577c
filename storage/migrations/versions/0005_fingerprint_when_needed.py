"""A certificate's fingerprint (the SHA-256 of its canonical content, document included) is computed only when the
same id is registered again, from the stored content and document: `certificates.fingerprint` may be NULL.
Fingerprints stored before stay and are used as they are.

Upgrading: a consumer of an older version, still running beside this one, compares a NULL fingerprint with the one
it computed and answers CONFLICT where this version answers ALREADY_EXISTS. Stop the older consumers first.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("certificates", "fingerprint", existing_type=sa.Text(), nullable=True)


def downgrade() -> None:
    # The versions before need every fingerprint: compute the missing ones, a batch at a time, in id order (each
    # batch starts after the last id of the one before, so none reads again the rows the batches before fixed).
    # Stop this version's consumers first: a row they insert meanwhile would fail the NOT NULL at the end.
    from domain.model import fingerprint

    connection = op.get_bind()
    select_missing = sa.text("""
        SELECT c.id, c.content, d.media_type, d.encoding, d.content AS document
        FROM certificates c JOIN certificate_documents d ON d.certificate_id = c.id
        WHERE c.fingerprint IS NULL AND c.id > :after ORDER BY c.id LIMIT 1000""")
    update = sa.text("UPDATE certificates SET fingerprint = :fingerprint WHERE id = :id")
    after = ""
    while rows := connection.execute(select_missing, {"after": after}).all():
        connection.execute(update, [
            {"id": r.id, "fingerprint": fingerprint({**r.content, "document": {
                "media_type": r.media_type, "encoding": r.encoding, "content": r.document}})} for r in rows])
        after = rows[-1].id
    op.alter_column("certificates", "fingerprint", existing_type=sa.Text(), nullable=False)
