"""Messages already handled, with the reply they got, so a redelivery is answered identically and changes
nothing (CONTRACT §2 `message_id`).

The row is written in the same transaction as the message's effects: either both are there or neither. Two
deliveries of one message running at once both miss in `get`; the second `add` then fails on the primary key,
which `storage.errors` calls transient, and its retry finds the stored reply.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, bindparam, select

from storage.tables import inbox
from storage.writes import insert_rows

_GET = select(inbox.c.message_type, inbox.c.reply, inbox.c.handled_at).where(
    inbox.c.message_id == bindparam("message_id"))


class SqlInbox:
    def __init__(self, connection: Connection) -> None:
        self._conn = connection
        self._absent: set[str] = set()  # ids known not to be in the inbox (`known_absent`), answered without a query

    def known_absent(self, message_ids: Iterable[str]) -> None:
        """The unit of work's warm-up found none of these in the inbox: `get` answers None for them without a
        query until `add`. Safe: another transaction adding one of them meanwhile makes our `add` fail on the
        primary key (transient), and the retry reads its row."""
        self._absent = set(message_ids)

    def forget(self) -> None:
        self._absent = set()

    def get(self, message_id: str) -> dict[str, Any] | None:
        """{"message_type", "reply", "handled_at"} of a handled message, else None."""
        if message_id in self._absent:
            return None
        row = self._conn.execute(_GET, {"message_id": message_id}).first()
        return None if row is None else dict(row._mapping)

    def add(self, message_id: str, message_type: str, reply: dict[str, Any] | None) -> None:
        """Queued with the unit of work's other writes (`storage.writes`); a later `get` of it flushes and finds it."""
        self._absent.discard(message_id)
        insert_rows(self._conn, inbox, [{"message_id": message_id, "message_type": message_type, "reply": reply}])
