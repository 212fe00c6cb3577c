"""`domain.ports.Certificates` on PostgreSQL.

Statuses are append-only, so `save` writes only the ones added since the certificate was loaded: the repository
remembers how many it loaded or stored per certificate id (callers `get(..., for_update=True)` before changing a
certificate, so that count is current). A read that locks nothing gets its rows and their statuses in one
statement; a locking read loads the statuses in a second one, after the lock is granted.
"""
from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import (Connection, Integer, Row, Select, Text, any_, bindparam, delete, func, literal, select,
                        true, tuple_, update)
from sqlalchemy.dialects.postgresql import ARRAY, TIMESTAMP, aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert

from domain.model import Certificate, StatusChange
from domain.ports import CitizenFilter, PageKey
from storage.errors import RacedWithPurge
from storage.tables import certificate_documents as documents
from storage.tables import certificate_statuses as statuses
from storage.tables import certificates as certs
from storage.tables import tombstones
from storage.writes import insert_rows

# Dates in a list filter are Swedish calendar days: a certificate signed 00:30 Swedish time on the 1st belongs
# to the 1st, although it is still the 31st in UTC.
CALENDAR_ZONE = "Europe/Stockholm"

_COLUMNS = (certs.c.id, certs.c.type, certs.c.patient_id, certs.c.care_giver_id, certs.c.care_unit_id,
            certs.c.signed_at, certs.c.test_certificate, certs.c.fingerprint, certs.c.content,
            certs.c.available_to_care, certs.c.archived, certs.c.revoked_at)
_DOCUMENT = (documents.c.media_type, documents.c.encoding, documents.c.content.label("document_content"))

# The read statements are built once per shape, with bound parameters, and reused: building a select with a
# subquery and a LATERAL join in SQLAlchemy costs several times what PostgreSQL needs to run it (an index lookup
# of a few rows), so a list or get that built its statement on every call spent most of its time in Python.
_SELECT = select(*_COLUMNS)


def _ordered(column):
    return func.array_agg(aggregate_order_by(column, statuses.c.position))


def _statuses_of(certificate_id):
    """The statuses of one certificate as three arrays, oldest first, for a LATERAL join: a read gets its rows and
    their statuses in one statement (one round trip). Only for reads that lock nothing: after waiting for a row
    lock, PostgreSQL re-checks the locked row but not what a subquery read, so a locking read loads the statuses
    in a statement of its own, taken after the lock is granted (`_STATUSES`)."""
    return (select(_ordered(statuses.c.status).label("status_list"), _ordered(statuses.c.target).label("target_list"),
                   _ordered(statuses.c.at).label("at_list"))
            .where(statuses.c.certificate_id == certificate_id)
            .lateral("st"))


_STATUSES = (select(statuses.c.certificate_id, statuses.c.status, statuses.c.target, statuses.c.at)
             .where(statuses.c.certificate_id.in_(bindparam("ids", expanding=True)))
             .order_by(statuses.c.certificate_id, statuses.c.position))
_IS_PURGED = select(literal(1)).where(tombstones.c.certificate_id == bindparam("certificate_id"))
_PURGED_AMONG = select(tombstones.c.certificate_id).where(
    tombstones.c.certificate_id == any_(bindparam("ids", type_=ARRAY(Text)))).limit(1)


@lru_cache(maxsize=None)
def _get_statement(with_document: bool, for_update: bool) -> Select:
    query = _SELECT.where(certs.c.id == bindparam("certificate_id"))
    if with_document:
        query = query.add_columns(*_DOCUMENT).outerjoin(documents, documents.c.certificate_id == certs.c.id)
    if for_update:
        return query.with_for_update(of=certs)
    listed = _statuses_of(certs.c.id)
    return query.add_columns(listed).join(listed, true(), isouter=True)


def day_start(name: str):
    """The instant the Swedish calendar day begins (the parameter is that day's midnight, without a zone),
    computed by PostgreSQL's own time zone data."""
    return func.timezone(CALENDAR_ZONE, bindparam(name, type_=TIMESTAMP(timezone=False)))


def midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time())


@lru_cache(maxsize=None)
def _citizen_page(types: bool, hidden: bool, signed_from: bool, signed_to: bool, after: bool) -> Select:
    conditions = [certs.c.patient_id == bindparam("patient_id"), certs.c.archived == bindparam("archived")]
    if types:
        conditions.append(certs.c.type.in_(bindparam("types", expanding=True)))
    if hidden:
        conditions.append(certs.c.type.not_in(bindparam("hidden_types", expanding=True)))
    if signed_from:
        conditions.append(certs.c.signed_at >= day_start("signed_from"))
    if signed_to:
        conditions.append(certs.c.signed_at < day_start("signed_before"))
    return _paged(_SELECT.where(*conditions), after)


@lru_cache(maxsize=None)
def _care_page(after: bool) -> Select:
    return _paged(_SELECT.where(
        certs.c.patient_id == bindparam("patient_id"),
        certs.c.care_giver_id == bindparam("care_giver_id"),
        certs.c.available_to_care,  # the partial index's predicate, written the same way
        certs.c.care_unit_id.in_(bindparam("care_unit_ids", expanding=True)),
    ), after)


def _paged(query: Select, after: bool) -> Select:
    """One statement: the page (an index scan in key order, stopped at the limit), then the statuses of just
    those rows."""
    if after:
        query = query.where(tuple_(certs.c.signed_at, certs.c.id) < tuple_(
            bindparam("after_signed_at", type_=certs.c.signed_at.type), bindparam("after_id", type_=certs.c.id.type)))
    page = (query.order_by(certs.c.signed_at.desc(), certs.c.id.desc())
            .limit(bindparam("limit", type_=Integer)).subquery("page"))
    listed = _statuses_of(page.c.id)
    return (select(page, listed).select_from(page.join(listed, true(), isouter=True))
            .order_by(page.c.signed_at.desc(), page.c.id.desc()))


def _date(value: Any) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(value)


class SqlCertificates:
    def __init__(self, connection: Connection) -> None:
        self._conn = connection
        self._stored: dict[str, int] = {}  # certificate id -> statuses known to be in the database
        # From the unit of work's warm-up (`known_absent`): ids with no row, and ids with no tombstone, answered
        # without a query. An id leaves these sets as soon as this transaction adds or purges it.
        self._absent: set[str] = set()
        self._unpurged: set[str] = set()
        self.purged: set[str] = set()  # purged in this transaction: the unit of work erases their outbox rows

    def known_absent(self, absent: Iterable[str], unpurged: Iterable[str]) -> None:
        """The warm-up found no certificate row for `absent` and no tombstone for `unpurged`: `get` answers None
        and `is_purged` False for them without a query. Safe for a transaction that then inserts one of them:
        another transaction that inserted it meanwhile makes our insert fail on the primary key (transient, and
        the retry reads the winner's row), and one that registered and purged it meanwhile is caught by the check
        after the insert (`_not_purged_since`)."""
        self._absent, self._unpurged = set(absent), set(unpurged)

    def forget(self) -> None:
        """After a rollback to a savepoint the counts may be ahead of the database; load again to be sure."""
        self._stored.clear()

    # --- reading -------------------------------------------------------------------------------------------
    def get(self, certificate_id: str, *, with_document: bool = False, for_update: bool = False) -> Certificate | None:
        if certificate_id in self._absent:
            return None
        row = self._conn.execute(_get_statement(with_document, for_update),
                                 {"certificate_id": certificate_id}).first()
        if row is None:
            return None
        if for_update:
            return self._with_statuses([row], with_document)[0]
        return self._certificate(row, _listed_statuses(row), with_document)

    def is_purged(self, certificate_id: str) -> bool:
        if certificate_id in self._unpurged:
            return False
        return self._conn.execute(_IS_PURGED, {"certificate_id": certificate_id}).first() is not None

    def list_for_citizen(self, query: CitizenFilter, after: PageKey | None, limit: int) -> Sequence[Certificate]:
        params: dict[str, Any] = {"patient_id": query.patient_id, "archived": query.archived}
        if query.types:
            params["types"] = sorted(query.types)
        if query.hidden_types:
            params["hidden_types"] = sorted(query.hidden_types)
        if query.signed_from is not None:
            params["signed_from"] = midnight(query.signed_from)
        if query.signed_to is not None:
            params["signed_before"] = midnight(query.signed_to + dt.timedelta(days=1))
        statement = _citizen_page(bool(query.types), bool(query.hidden_types), query.signed_from is not None,
                                  query.signed_to is not None, after is not None)
        return self._page(statement, params, after, limit)

    def list_for_care(self, patient_id: str, care_giver_id: str, care_unit_ids: frozenset[str],
                      after: PageKey | None, limit: int) -> Sequence[Certificate]:
        if not care_unit_ids:
            return []
        params = {"patient_id": patient_id, "care_giver_id": care_giver_id, "care_unit_ids": sorted(care_unit_ids)}
        return self._page(_care_page(after is not None), params, after, limit)

    def without_care_copy(self, patient_id: str, *, for_update: bool = False) -> Sequence[Certificate]:
        query = (_SELECT
                 .where(certs.c.patient_id == patient_id, ~certs.c.available_to_care)
                 .order_by(certs.c.id))
        if for_update:
            query = query.with_for_update()
        return self._with_statuses(self._conn.execute(query).all())

    def care_copies(self, care_giver_id: str, limit: int, *, for_update: bool = True) -> Sequence[Certificate]:
        """Locked in id order (no SKIP LOCKED: every copy must be handled, a locked one just waits).
        `for_update=False` lets a caller take its patient locks first and lock each row after, in the same
        order as every other command (patient, then row), which avoids deadlocks with them."""
        query = (_SELECT
                 .where(certs.c.care_giver_id == care_giver_id, certs.c.available_to_care)
                 .order_by(certs.c.id).limit(limit))
        if for_update:
            query = query.with_for_update()
        return self._with_statuses(self._conn.execute(query).all())

    def _page(self, statement: Select, params: dict[str, Any], after: PageKey | None,
              limit: int) -> list[Certificate]:
        params["limit"] = limit
        if after is not None:
            params["after_signed_at"], params["after_id"] = after.signed_at, after.certificate_id
        rows = self._conn.execute(statement, params).all()
        return [self._certificate(row, _listed_statuses(row)) for row in rows]

    def _with_statuses(self, rows: Sequence[Row], with_document: bool = False) -> list[Certificate]:
        if not rows:
            return []
        ids = [row.id for row in rows]
        by_id: dict[str, list[StatusChange]] = defaultdict(list)
        for status in self._conn.execute(_STATUSES, {"ids": ids}):
            by_id[status.certificate_id].append(StatusChange(status.status, status.target, status.at))
        return [self._certificate(row, by_id.get(row.id, []), with_document) for row in rows]

    def _certificate(self, row: Row, changes: list[StatusChange], with_document: bool = False) -> Certificate:
        self._stored[row.id] = len(changes)
        return Certificate(
            id=row.id, type=row.type, patient_id=row.patient_id, care_giver_id=row.care_giver_id,
            care_unit_id=row.care_unit_id, signed_at=row.signed_at, test_certificate=row.test_certificate,
            fingerprint=row.fingerprint, content=row.content, available_to_care=row.available_to_care,
            archived=row.archived, revoked_at=row.revoked_at, statuses=changes,
            document=_document(row) if with_document else None,
        )

    # --- writing -------------------------------------------------------------------------------------------
    def add(self, certificate: Certificate) -> None:
        """Queued with the unit of work's other writes (`storage.writes`): one COPY or executemany per table for
        a whole batch; a later read of it flushes first and finds it."""
        content = certificate.content
        self._absent.discard(certificate.id)
        insert_rows(self._conn, certs, [{
            "id": certificate.id, "patient_id": certificate.patient_id, "type": certificate.type,
            "type_version": content.get("type_version"), "signed_at": certificate.signed_at,
            "valid_from": _date(content.get("valid_from")), "valid_to": _date(content.get("valid_to")),
            "care_unit_id": certificate.care_unit_id, "care_giver_id": certificate.care_giver_id,
            "test_certificate": certificate.test_certificate, "fingerprint": certificate.fingerprint,
            "content": content, "available_to_care": certificate.available_to_care,
            "archived": certificate.archived, "revoked_at": certificate.revoked_at,
        }])
        if certificate.document is not None:
            document = certificate.document
            insert_rows(self._conn, documents, [{
                "certificate_id": certificate.id, "media_type": document["media_type"],
                "encoding": document.get("encoding") or "utf-8", "content": document["content"]}])
        self._stored[certificate.id] = 0
        self._insert_statuses(certificate, 0)

    def _not_purged_since(self, rows: Sequence[dict[str, Any]]) -> None:
        """Run right after certificate rows are inserted (`BufferedConnection.after_flush`). Register checks for a
        tombstone before it inserts, without a lock; if another transaction registered the same id and purged it
        in between, our insert succeeds (the row it deleted no longer conflicts) and the tombstone is already
        committed: seen here, and the whole transaction is retried, which then answers PURGED."""
        ids = [row["id"] for row in rows]
        if self._conn.execute(_PURGED_AMONG, {"ids": ids}).first() is not None:
            raise RacedWithPurge("raced with a purge of the same certificate id")

    def save(self, certificate: Certificate) -> None:
        self._conn.execute(update(certs).where(certs.c.id == certificate.id).values(
            available_to_care=certificate.available_to_care, archived=certificate.archived,
            revoked_at=certificate.revoked_at))
        stored = self._stored.get(certificate.id)
        if stored is None:  # not loaded through this repository (or forgotten after a savepoint rollback)
            stored = self._conn.execute(
                select(func.count()).where(statuses.c.certificate_id == certificate.id)).scalar_one()
        self._insert_statuses(certificate, stored)

    def purge(self, certificate: Certificate, reason: str, at: dt.datetime) -> None:
        # Document and statuses go with the row (ON DELETE CASCADE); the tombstone keeps the id from coming back.
        self._absent.discard(certificate.id)
        self._unpurged.discard(certificate.id)
        self._conn.execute(delete(certs).where(certs.c.id == certificate.id))
        self._conn.execute(pg_insert(tombstones).values(certificate_id=certificate.id, purged_at=at, reason=reason)
                           .on_conflict_do_nothing(index_elements=[tombstones.c.certificate_id]))
        self._stored.pop(certificate.id, None)
        self.purged.add(certificate.id)

    def _insert_statuses(self, certificate: Certificate, stored: int) -> None:
        new = certificate.statuses[stored:]
        if not new:
            return
        insert_rows(self._conn, statuses, [
            {"certificate_id": certificate.id, "position": position, "status": change.status,
             "target": change.target, "at": change.at}
            for position, change in enumerate(new, start=stored)])
        self._stored[certificate.id] = len(certificate.statuses)


def _listed_statuses(row: Row) -> list[StatusChange]:
    if row.status_list is None:  # array_agg of no rows is NULL
        return []
    return [StatusChange(status, target, at) for status, target, at in zip(row.status_list, row.target_list,
                                                                          row.at_list)]


def _document(row: Row) -> dict[str, Any] | None:
    if row.media_type is None:
        return None
    return {"media_type": row.media_type, "encoding": row.encoding, "content": row.document_content}


__all__ = ("SqlCertificates", "CALENDAR_ZONE")
