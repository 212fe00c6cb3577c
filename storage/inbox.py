"""Messages already handled, with the reply they got, so a redelivery is answered identically and changes
nothing (CONTRACT §2 `message_id`).

The row is written in the same transaction as the message's effects: either both are there or neither. Two
deliveries of one message running at once both miss in `get`; the second `add` then fails on the primary key,
which `storage.errors` calls transient, and its retry finds the stored reply.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert, select

from storage.tables import inbox


class SqlInbox:
    def __init__(self, connection: Connection) -> None:
        self._conn = connection

    def get(self, message_id: str) -> dict[str, Any] | None:
        """{"message_type", "reply", "handled_at"} of a handled message, else None."""
        row = self._conn.execute(
            select(inbox.c.message_type, inbox.c.reply, inbox.c.handled_at).where(inbox.c.message_id == message_id)
        ).first()
        return None if row is None else dict(row._mapping)

    def add(self, message_id: str, message_type: str, reply: dict[str, Any] | None) -> None:
        self._conn.execute(insert(inbox).values(message_id=message_id, message_type=message_type, reply=reply))
