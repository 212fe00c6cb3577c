"""Running totals of a care giver's leaving (`care-giver.remove-care-copies`).

The command is done in bounded batches, each its own transaction, so that one large care giver neither holds
thousands of row locks nor runs into the statement timeout. The reply must still count everything, so each
batch adds its counts here under the command's message id, in the same transaction as the batch.
"""
from __future__ import annotations

from sqlalchemy import Connection, func, select
from sqlalchemy.dialects.postgresql import insert

from storage.tables import bulk_progress as progress


class SqlProgress:
    def __init__(self, connection: Connection) -> None:
        self._conn = connection

    def get(self, message_id: str) -> tuple[int, int]:
        """(citizen_only, purged) so far; (0, 0) before the first batch."""
        row = self._conn.execute(select(progress.c.citizen_only, progress.c.purged)
                                 .where(progress.c.message_id == message_id)).first()
        return (0, 0) if row is None else (row.citizen_only, row.purged)

    def add(self, message_id: str, citizen_only: int, purged: int) -> None:
        statement = insert(progress).values(message_id=message_id, citizen_only=citizen_only, purged=purged)
        self._conn.execute(statement.on_conflict_do_update(
            index_elements=[progress.c.message_id],
            set_={"citizen_only": progress.c.citizen_only + statement.excluded.citizen_only,
                  "purged": progress.c.purged + statement.excluded.purged,
                  "updated_at": func.now()}))
