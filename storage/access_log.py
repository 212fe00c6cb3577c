"""`domain.ports.AccessLog` on PostgreSQL (CONTRACT §9); its retention is `storage.retention`'s.

One statement stores the entries not stored before (`ON CONFLICT DO NOTHING` on message and certificate id) and
queues in the outbox the publication of exactly those: a redelivered query, which the inbox does not keep, neither
logs nor publishes an entry twice. Nobody reads its result, so it waits with the unit of work's other writes
(`storage.writes`) and rides their pipeline: a care read pays for no extra round trip.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Integer, Select, bindparam, select, tuple_

from domain.access import Access
from domain.ports import AccessFilter, AccessKey
from storage.certificates import day_start, midnight
from storage.outbox import OutboxMessage, SqlOutbox
from storage.tables import access_log as log
from storage.writes import BufferedConnection

_FIELDS = ("message_id", "certificate_id", "at", "action", "certificate_type", "patient_id", "care_giver_id",
           "person_id", "person_name", "care_unit_id")
_ARRAY_TYPES = ("varchar", "text", "timestamptz", "text", "text", "bpchar", "text", "text", "text", "text")
_PUBLISHED = ("event_id", "exchange", "routing_key", "body")
_ADD = (  # psycopg's own SQL: queued raw in the pipeline (`BufferedConnection.defer_statement`)
    f"WITH new AS (INSERT INTO access_log ({', '.join(_FIELDS)}) "
    f"SELECT * FROM unnest({', '.join(f'CAST(%({n})s AS {t}[])' for n, t in zip(_FIELDS, _ARRAY_TYPES))}) "
    "ON CONFLICT (message_id, certificate_id) DO NOTHING RETURNING message_id, certificate_id) "
    # an entry names the patient: erased once published, like a recipient delivery (§8)
    "INSERT INTO outbox (kind, exchange, routing_key, message_id, content_type, body, erase_when_published) "
    "SELECT 'event', e.exchange, e.routing_key, e.event_id, 'application/json', e.body, true "
    "FROM unnest(CAST(%(message_id)s AS varchar[]), CAST(%(certificate_id)s AS text[]), "
    "CAST(%(event_id)s AS text[]), CAST(%(exchange)s AS text[]), CAST(%(routing_key)s AS text[]), "
    "CAST(%(body)s AS bytea[])) WITH ORDINALITY AS e(message_id, certificate_id, event_id, exchange, routing_key, "
    "body, position) "
    "JOIN new USING (message_id, certificate_id) ORDER BY e.position")
_SELECT = select(*(log.c[name] for name in _FIELDS))


@lru_cache(maxsize=None)
def _page(day_from: bool, day_to: bool, after: bool) -> Select:
    conditions = [log.c.patient_id == bindparam("patient_id")]
    if day_from:
        conditions.append(log.c.at >= day_start("day_from"))
    if day_to:
        conditions.append(log.c.at < day_start("day_after"))
    if after:
        conditions.append(tuple_(log.c.at, log.c.message_id, log.c.certificate_id) < tuple_(
            bindparam("after_at", type_=log.c.at.type), bindparam("after_message_id", type_=log.c.message_id.type),
            bindparam("after_certificate_id", type_=log.c.certificate_id.type)))
    return (_SELECT.where(*conditions)
            .order_by(log.c.at.desc(), log.c.message_id.desc(), log.c.certificate_id.desc())
            .limit(bindparam("limit", type_=Integer)))


class SqlAccessLog:
    def __init__(self, connection: Connection, outbox: SqlOutbox) -> None:
        self._conn = connection
        self._outbox = outbox

    def add(self, entries: Sequence[Access], publications: Sequence[OutboxMessage]) -> None:
        if not entries:
            return
        params: dict[str, Any] = {name: [getattr(e, name) for e in entries] for name in _FIELDS}
        params.update({"event_id": [m.message_id for m in publications],
                       "exchange": [m.exchange for m in publications],
                       "routing_key": [m.routing_key for m in publications],
                       "body": [m.body for m in publications]})
        self._outbox.added = True  # a relay in another process is told at commit (NOTIFY)
        if isinstance(self._conn, BufferedConnection):
            self._conn.defer_statement(_ADD, params)
        else:
            self._conn.exec_driver_sql(_ADD, params)

    def list_for_patient(self, query: AccessFilter, after: AccessKey | None, limit: int) -> list[Access]:
        params: dict[str, Any] = {"patient_id": query.patient_id, "limit": limit}
        if query.day_from is not None:
            params["day_from"] = midnight(query.day_from)
        if query.day_to is not None:
            params["day_after"] = midnight(query.day_to + dt.timedelta(days=1))
        if after is not None:
            params.update(after_at=after.at, after_message_id=after.message_id,
                          after_certificate_id=after.certificate_id)
        statement = _page(query.day_from is not None, query.day_to is not None, after is not None)
        return [Access(**row._mapping) for row in self._conn.execute(statement, params)]


__all__ = ("SqlAccessLog",)
