"""storage/ against a real PostgreSQL: schema, repositories, unit of work, outbox, locking and error kinds.

The module works in a database of its own, created next to the session's `database_url`, so that migrating
from empty can be checked and other modules' data never shows up in a list.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
import time
import uuid
from contextlib import contextmanager

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError, StatementError

from domain.model import Certificate, StatusChange
from domain.ports import CitizenFilter, PageKey
from storage import migrate
from storage import outbox as relay
from storage.engine import SessionLost, make_engine, one_session, to_sqlalchemy_url
from storage.errors import is_transient
from storage.outbox import OutboxMessage
from storage.tables import (certificate_documents, certificate_statuses, certificates, consents, metadata, outbox,
                            tombstones)
from storage.uow import SqlUnitOfWork

try:
    from tests import factories
    from tests.databases import FreshDatabase as _FreshDatabase, empty_tables, migrated_database
except ImportError:  # tests/ itself on sys.path
    import factories
    from databases import FreshDatabase as _FreshDatabase, empty_tables, migrated_database

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
PATIENT, OTHER_PATIENT = factories.PATIENT, factories.OTHER_PATIENT
HIDDEN = frozenset({"db", "doi"})
_MODEL_ONLY = ("available_to_care", "archived", "revoked_at", "statuses")


def fingerprint(certificate_json: dict) -> str:
    """Stand-in for the domain's canonical fingerprint: sha256 of the sorted, compact JSON, document included."""
    canonical = json.dumps(certificate_json, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def certificate(**overrides) -> Certificate:
    """The aggregate as registered from `factories.certificate_json`, with a fresh id unless given.
    `care_giver_id`/`care_unit_id` reach into `issued_by`; datetimes are written in wire form; the model-only
    fields (`available_to_care`, `archived`, `revoked_at`, `statuses` as tuples or StatusChange) are set after."""
    model = {key: overrides.pop(key) for key in _MODEL_ONLY if key in overrides}
    if "care_giver_id" in overrides or "care_unit_id" in overrides:
        overrides["issued_by"] = factories.issued_by(overrides.pop("care_giver_id", factories.CARE_GIVER),
                                                     overrides.pop("care_unit_id", factories.CARE_UNIT))
    overrides.setdefault("id", str(uuid.uuid4()))
    overrides = {k: v.isoformat() if isinstance(v, dt.date) else v for k, v in overrides.items()}
    body = factories.certificate_json(**overrides)
    model["statuses"] = [s if isinstance(s, StatusChange) else StatusChange(*s) for s in model.get("statuses", [])]
    return Certificate(
        id=body["id"], type=body["type"], patient_id=body["patient_id"],
        care_giver_id=body["issued_by"]["care_giver"]["id"], care_unit_id=body["issued_by"]["care_unit"]["id"],
        signed_at=dt.datetime.fromisoformat(body["signed_at"]), test_certificate=body["test_certificate"],
        fingerprint=fingerprint(body), content={k: v for k, v in body.items() if k != "document"},
        document=body.get("document"), **model)


# --- databases --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def storage_url(database_url):
    with migrated_database(database_url, "storage") as url:
        yield url


@pytest.fixture(scope="module")
def engine(storage_url):
    engine = make_engine(storage_url)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _empty_tables(request):
    if "engine" in request.fixturenames:
        empty_tables(request.getfixturevalue("engine"))
    yield


def _store(engine, *items):
    with SqlUnitOfWork(engine) as uow:
        for item in items:
            uow.certificates.add(item)
        uow.commit()
    return items


def _count(engine, table, **where) -> int:
    with engine.connect() as conn:
        query = select(func.count()).select_from(table)
        for column, value in where.items():
            query = query.where(table.c[column] == value)
        return conn.execute(query).scalar_one()


# --- engine and migrations --------------------------------------------------------------------------------------
def test_plain_urls_are_turned_into_psycopg_urls():
    assert to_sqlalchemy_url("postgres://u@h:5432/d").drivername == "postgresql+psycopg"
    assert to_sqlalchemy_url("postgresql://u@h/d").render_as_string() == "postgresql+psycopg://u@h/d"
    with pytest.raises(ValueError):
        to_sqlalchemy_url("mysql://u@h/d")


def test_migrate_from_empty_then_again_is_a_no_op(database_url):
    with _FreshDatabase(database_url, "migrate") as url:
        assert migrate.current(url) is None
        migrate.upgrade(url)
        assert migrate.current(url) == migrate.head() == "0005"
        migrate.upgrade(url)
        assert migrate.current(url) == "0005"
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                names = set(conn.execute(text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
                assert names >= {t.name for t in metadata.sorted_tables}
                # The hand-written revision creates exactly what storage.tables describes.
                assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        finally:
            engine.dispose()


def test_downgrading_below_0005_computes_the_fingerprints_the_older_versions_need(database_url):
    from alembic import command

    with _FreshDatabase(database_url, "downgrade") as url:
        migrate.upgrade(url)
        engine = make_engine(url)
        try:
            new = factories.certificate(id="stored-without", fingerprinted=False)
            with SqlUnitOfWork(engine) as uow:
                uow.certificates.add(new)
                uow.commit()
            with engine.begin() as conn:
                command.downgrade(migrate.config(conn), "0004")
            with engine.connect() as conn:
                stored = conn.execute(select(certificates.c.fingerprint)).scalar_one()
                nullable = conn.execute(text("SELECT is_nullable FROM information_schema.columns WHERE "
                                             "table_name = 'certificates' AND column_name = 'fingerprint'")).scalar_one()
            assert stored == factories.certificate(id="stored-without").fingerprint and nullable == "NO"
        finally:
            engine.dispose()


def test_connections_have_timeouts_and_utc(engine):
    with engine.connect() as conn:
        assert conn.execute(text("SHOW lock_timeout")).scalar_one() == "5s"
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "30s"
        assert conn.execute(text("SHOW timezone")).scalar_one() == "UTC"


# --- certificates -----------------------------------------------------------------------------------------------
def test_round_trip_keeps_the_document_byte_for_byte(engine):
    odd = ('<?xml version="1.0" encoding="UTF-8"?>\r\n<intyg>\tÅÄÖ åäö – “citat” \u00a0nbsp\u2028'
           ' 🩺 \u200b\r\n   trailing   \n\n</intyg>\n \t ')
    stored = certificate(document={"media_type": "application/xml", "encoding": "utf-8", "content": odd},
                                   statuses=[StatusChange("RECEIVED", None, NOW)])
    base64_doc = certificate(document={"media_type": "application/pdf", "encoding": "base64",
                                                 "content": "JVBERi0xLjQKJcOkw7zDtsOf\n"})
    _store(engine, stored, base64_doc)

    with SqlUnitOfWork(engine) as uow:
        got = uow.certificates.get(stored.id, with_document=True)
        assert got.document["content"].encode("utf-8") == odd.encode("utf-8")
        assert got.document == stored.document
        assert got == stored  # every field: flags, statuses, content, signed_at (same instant), fingerprint
        assert uow.certificates.get(base64_doc.id, with_document=True).document == base64_doc.document
        assert uow.certificates.get(stored.id).document is None
        assert uow.certificates.get("no-such-id") is None


def test_derived_columns_come_from_the_content(engine):
    cert = certificate(type_version="2.0", valid_from=None, valid_to="2027-01-31")
    _store(engine, cert)
    with engine.connect() as conn:
        row = conn.execute(select(certificates).where(certificates.c.id == cert.id)).one()
    assert (row.type_version, row.valid_from, row.valid_to) == ("2.0", None, dt.date(2027, 1, 31))


def test_save_updates_flags_and_appends_only_new_statuses(engine):
    cert = certificate(statuses=[StatusChange("RECEIVED", None, NOW)])
    _store(engine, cert)
    with SqlUnitOfWork(engine) as uow:
        loaded = uow.certificates.get(cert.id, for_update=True)
        loaded.record("SENT", NOW + dt.timedelta(minutes=1), target="FKASSA")
        loaded.record("ARCHIVED", NOW + dt.timedelta(minutes=2))
        loaded.archived = True
        loaded.revoked_at = NOW + dt.timedelta(minutes=3)
        uow.certificates.save(loaded)
        uow.certificates.save(loaded)  # nothing new: no duplicate
        loaded.record("REVOKED", NOW, target="SE2321000016-1003")  # earlier `at` still goes last
        uow.certificates.save(loaded)
        uow.commit()
    with SqlUnitOfWork(engine) as uow:
        again = uow.certificates.get(cert.id)
    assert [s.status for s in again.statuses] == ["RECEIVED", "SENT", "ARCHIVED", "REVOKED"]
    assert again.sent_to == ["FKASSA"]
    assert again.archived and again.revoked_at == NOW + dt.timedelta(minutes=3)


def test_save_of_a_certificate_not_loaded_here_counts_stored_statuses(engine):
    cert = certificate(statuses=[StatusChange("RECEIVED", None, NOW)])
    _store(engine, cert)
    cert.record("SENT", NOW, target="FKASSA")
    with SqlUnitOfWork(engine) as uow:  # a fresh repository has never seen it
        uow.certificates.save(cert)
        uow.commit()
    assert _count(engine, certificate_statuses, certificate_id=cert.id) == 2


def test_purge_leaves_only_a_tombstone(engine):
    cert = certificate(statuses=[StatusChange("RECEIVED", None, NOW),
                                           StatusChange("CARE_COPY_REMOVED", "x", NOW)])
    keep = certificate()
    _store(engine, cert, keep)
    with SqlUnitOfWork(engine) as uow:
        uow.certificates.purge(uow.certificates.get(cert.id, for_update=True), "CONSENT_WITHDRAWN", NOW)
        uow.certificates.purge(cert, "CONSENT_WITHDRAWN", NOW + dt.timedelta(hours=1))  # again: no error
        uow.commit()
    with SqlUnitOfWork(engine) as uow:
        assert uow.certificates.get(cert.id, with_document=True) is None
        assert uow.certificates.is_purged(cert.id)
        assert not uow.certificates.is_purged(keep.id)
    assert _count(engine, certificates, id=cert.id) == 0
    assert _count(engine, certificate_statuses, certificate_id=cert.id) == 0
    assert _count(engine, certificate_documents, certificate_id=cert.id) == 0
    with engine.connect() as conn:
        row = conn.execute(select(tombstones)).one()
    assert (row.certificate_id, row.reason, row.purged_at) == (cert.id, "CONSENT_WITHDRAWN", NOW)
    assert _count(engine, certificates, id=keep.id) == 1


def _citizen(**overrides) -> CitizenFilter:
    values = dict(patient_id=PATIENT, archived=False, types=frozenset(), hidden_types=HIDDEN,
                  signed_from=None, signed_to=None)
    values.update(overrides)
    return CitizenFilter(**values)


def _ids(found) -> list[str]:
    return [c.id for c in found]


def test_list_for_citizen_filters(engine):
    at = lambda *args: dt.datetime(*args, tzinfo=UTC)  # noqa: E731
    lisjp = certificate(id="a-lisjp", signed_at=at(2026, 1, 10, 10), statuses=[("RECEIVED", None, NOW)])
    luse = certificate(id="b-luse", type="luse", signed_at=at(2026, 1, 5, 10))
    death = certificate(id="c-db", type="db", signed_at=at(2026, 1, 6, 10))
    filed = certificate(id="d-archived", archived=True, signed_at=at(2026, 1, 7, 10))
    # 23:30 UTC on 31 January is 00:30 on 1 February in Stockholm.
    night = certificate(id="e-night", signed_at=at(2026, 1, 31, 23, 30))
    # 21:59:59 UTC in summer is 23:59:59 on the same day in Stockholm (UTC+2).
    summer = certificate(id="f-summer", signed_at=at(2026, 7, 1, 21, 59, 59))
    someone_else = certificate(id="g-other", patient_id=OTHER_PATIENT)
    _store(engine, lisjp, luse, death, filed, night, summer, someone_else)

    with SqlUnitOfWork(engine) as uow:
        found = uow.certificates.list_for_citizen
        assert _ids(found(_citizen(), None, 100)) == ["f-summer", "e-night", "a-lisjp", "b-luse"]
        assert _ids(found(_citizen(archived=True), None, 100)) == ["d-archived"]
        assert _ids(found(_citizen(types=frozenset({"luse", "db"})), None, 100)) == ["b-luse"]
        assert _ids(found(_citizen(hidden_types=frozenset()), None, 100)) == [
            "f-summer", "e-night", "a-lisjp", "c-db", "b-luse"]
        assert _ids(found(_citizen(signed_from=dt.date(2026, 2, 1)), None, 100)) == ["f-summer", "e-night"]
        assert _ids(found(_citizen(signed_to=dt.date(2026, 1, 31)), None, 100)) == ["a-lisjp", "b-luse"]
        assert _ids(found(_citizen(signed_from=dt.date(2026, 7, 1), signed_to=dt.date(2026, 7, 1)),
                          None, 100)) == ["f-summer"]
        assert _ids(found(_citizen(signed_from=dt.date(2026, 1, 10), signed_to=dt.date(2026, 1, 10)),
                          None, 100)) == ["a-lisjp"]
        page = found(_citizen(), None, 100)
        assert all(c.document is None for c in page)
        assert [s.status for s in page[2].statuses] == ["RECEIVED"]


def test_list_for_citizen_pages_through_without_gaps_or_duplicates(engine):
    base = dt.datetime(2026, 3, 1, 8, tzinfo=UTC)
    # Pairs share a signed_at, so the id tie-break matters at page edges.
    made = [certificate(id=f"c{i:02d}", signed_at=base + dt.timedelta(hours=i // 2),
                                  statuses=[("RECEIVED", None, NOW), ("SENT", f"R{i}", NOW)])
            for i in range(25)]
    _store(engine, *made)
    expected = sorted(made, key=lambda c: (c.signed_at, c.id), reverse=True)

    pages, after = [], None
    with SqlUnitOfWork(engine) as uow:
        while True:
            page = uow.certificates.list_for_citizen(_citizen(), after, 10)
            if not page:
                break
            pages.append(page)
            after = PageKey(page[-1].signed_at, page[-1].id)
    assert [len(p) for p in pages] == [10, 10, 5]
    seen = [c for p in pages for c in p]
    assert _ids(seen) == _ids(expected)
    assert all(c.sent_to == [f"R{int(c.id[1:])}"] for c in seen)


def test_list_for_care_shows_only_care_copies_of_the_given_units(engine):
    giver, unit1, unit2 = "VG-1", "VE-1", "VE-2"
    at = lambda day: dt.datetime(2026, 2, day, tzinfo=UTC)  # noqa: E731
    one = certificate(id="one", care_giver_id=giver, care_unit_id=unit1, signed_at=at(1))
    two = certificate(id="two", care_giver_id=giver, care_unit_id=unit2, signed_at=at(2))
    death = certificate(id="death", type="db", care_giver_id=giver, care_unit_id=unit1, signed_at=at(3))
    removed = certificate(id="removed", care_giver_id=giver, care_unit_id=unit1, available_to_care=False)
    archived = certificate(id="archived", care_giver_id=giver, care_unit_id=unit1, archived=True,
                                     signed_at=at(4))
    other_giver = certificate(id="other", care_giver_id="VG-2", care_unit_id=unit1)
    other_patient = certificate(id="elsewhere", care_giver_id=giver, care_unit_id=unit1,
                                          patient_id=OTHER_PATIENT)
    _store(engine, one, two, death, removed, archived, other_giver, other_patient)

    with SqlUnitOfWork(engine) as uow:
        found = uow.certificates.list_for_care
        assert _ids(found(PATIENT, giver, frozenset({unit1}), None, 10)) == ["archived", "death", "one"]
        assert _ids(found(PATIENT, giver, frozenset({unit1, unit2}), None, 10)) == [
            "archived", "death", "two", "one"]
        assert _ids(found(PATIENT, giver, frozenset({unit1, unit2}), PageKey(at(3), "death"), 10)) == [
            "two", "one"]
        assert _ids(found(PATIENT, "VG-2", frozenset({unit2}), None, 10)) == []
        assert found(PATIENT, giver, frozenset(), None, 10) == []


def test_without_care_copy_and_care_copies(engine):
    kept = [certificate(id=f"k{i}", care_giver_id="VG-1") for i in range(5)]
    citizen_only = certificate(id="z", available_to_care=False, statuses=[("RECEIVED", None, NOW)])
    other = certificate(id="o", available_to_care=False, patient_id=OTHER_PATIENT)
    _store(engine, *reversed(kept), citizen_only, other)
    with SqlUnitOfWork(engine) as uow:
        assert _ids(uow.certificates.without_care_copy(PATIENT, for_update=True)) == ["z"]
        assert uow.certificates.without_care_copy(PATIENT)[0].statuses[0].status == "RECEIVED"
        batch = uow.certificates.care_copies("VG-1", 3)
        assert _ids(batch) == ["k0", "k1", "k2"]
        for cert in batch:
            cert.available_to_care = False
            cert.record("CARE_COPY_REMOVED", NOW, target="VG-1")
            uow.certificates.save(cert)
        assert _ids(uow.certificates.care_copies("VG-1", 3)) == ["k3", "k4"]
        assert _ids(uow.certificates.care_copies("VG-1", 1, for_update=False)) == ["k3"]


# --- consents, inbox, progress ----------------------------------------------------------------------------------
def test_consent_defaults_to_not_given_and_upserts(engine):
    with SqlUnitOfWork(engine) as uow:
        assert uow.consents.get(PATIENT) == type(uow.consents.get(""))(PATIENT, False, None)
        consent = uow.consents.get(PATIENT)
        consent.given, consent.changed_at = True, NOW
        uow.consents.save(consent)
        consent.given, consent.changed_at = False, NOW + dt.timedelta(days=1)
        uow.consents.save(consent)
        uow.commit()
    with SqlUnitOfWork(engine) as uow:
        got = uow.consents.get(PATIENT)
    assert (got.given, got.changed_at) == (False, NOW + dt.timedelta(days=1))
    assert _count(engine, consents) == 1


def test_inbox_round_trip(engine):
    reply = {"result": "INFO", "error_id": None, "code": "ALREADY_EXISTS", "message": "redan lagrat – åäö",
             "request_id": "m-1", "data": {"n": 1, "nested": [True, None, 1.5]}}
    with SqlUnitOfWork(engine) as uow:
        assert uow.inbox.get("m-1") is None
        uow.inbox.add("m-1", "certificate.register", reply)
        uow.inbox.add("m-2", "consent.set", None)
        uow.commit()
    with SqlUnitOfWork(engine) as uow:
        got = uow.inbox.get("m-1")
        assert (got["message_type"], got["reply"]) == ("certificate.register", reply)
        assert got["handled_at"] is not None
        assert uow.inbox.get("m-2")["reply"] is None
        with pytest.raises(DBAPIError) as raised:  # a concurrent duplicate: retried, then answered from here
            uow.inbox.add("m-1", "certificate.register", reply)
            uow.flush()  # inserts are queued until the next statement, savepoint end or commit (storage.writes)
        assert is_transient(raised.value)


def test_progress_adds_up(engine):
    with SqlUnitOfWork(engine) as uow:
        assert uow.progress.get("bulk-1") == (0, 0)
        uow.progress.add("bulk-1", 1, 2)
        uow.progress.add("bulk-1", 3, 4)
        uow.commit()
    with SqlUnitOfWork(engine) as uow:
        assert uow.progress.get("bulk-1") == (4, 6)
        assert uow.progress.get("bulk-2") == (0, 0)


# --- unit of work -----------------------------------------------------------------------------------------------
def test_unit_of_work_rolls_back_unless_committed(engine):
    dropped, kept, late = certificate(), certificate(), certificate()
    with SqlUnitOfWork(engine) as uow:
        uow.certificates.add(dropped)
    with pytest.raises(RuntimeError):
        with SqlUnitOfWork(engine) as uow:
            uow.certificates.add(dropped)
            raise RuntimeError("handler failed")
    with SqlUnitOfWork(engine) as uow:
        uow.certificates.add(kept)
        uow.commit()
        uow.certificates.add(late)  # after commit, in a new transaction that is never committed
    with SqlUnitOfWork(engine) as uow:
        assert uow.certificates.get(dropped.id) is None
        assert uow.certificates.get(kept.id) is not None
        assert uow.certificates.get(late.id) is None


def test_savepoint_rolls_back_only_the_failed_message(engine):
    first, failing, third = (certificate() for _ in range(3))
    with SqlUnitOfWork(engine) as uow:
        with uow.savepoint():
            uow.certificates.add(first)
        with pytest.raises(ValueError):
            with uow.savepoint():
                uow.certificates.add(failing)
                raise ValueError("bad message")
        with pytest.raises(DBAPIError):  # a database error inside does not poison the transaction
            with uow.savepoint():
                uow.certificates.add(first)
        with uow.savepoint():
            loaded = uow.certificates.get(first.id, for_update=True)
            loaded.record("SENT", NOW, target="FKASSA")
            uow.certificates.save(loaded)
            uow.certificates.add(third)
        uow.commit()
    with SqlUnitOfWork(engine) as uow:
        assert uow.certificates.get(first.id).sent_to == ["FKASSA"]
        assert uow.certificates.get(failing.id) is None
        assert uow.certificates.get(third.id) is not None


# --- outbox -----------------------------------------------------------------------------------------------------
def _message(n: int, kind: str = "event", key: str | None = None) -> OutboxMessage:
    return OutboxMessage(kind=kind, exchange="intyg.events" if kind == "event" else "",
                         routing_key=f"rk.{n}", message_id=f"msg-{n}", body=f'{{"n":{n},"å":"ä"}}'.encode(),
                         correlation_id=f"c-{n}" if kind == "reply" else None, headers={"x-n": n},
                         ordering_key=key)


@contextmanager
def leading(engine):
    """A connection whose session holds the relay lock, as the relay's statements require."""
    with engine.connect() as conn:
        assert relay.try_lead(conn)
        conn.commit()
        try:
            yield conn
        finally:
            conn.rollback()
            relay.release_lead(conn)
            conn.commit()


def _publish_everything(engine) -> None:
    """What earlier tests left is not the next test's business."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE outbox SET published_at = now() WHERE published_at IS NULL"))


def test_outbox_publishes_in_order(engine):
    _publish_everything(engine)
    with SqlUnitOfWork(engine) as uow:
        uow.outbox.add([_message(1), _message(2), _message(3, "reply")])
        uow.commit()
    with SqlUnitOfWork(engine) as uow:
        uow.outbox.add([_message(4)])
        uow.outbox.add([])
        uow.commit()
    with SqlUnitOfWork(engine) as uow:
        uow.outbox.add([_message(99)])  # rolled back: never published

    with leading(engine) as conn:
        assert relay.pending_count(conn) == 4
        rows = relay.unpublished(conn, 10)
        assert [r.message_id for r in rows] == ["msg-1", "msg-2", "msg-3", "msg-4"]
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        third = rows[2]
        assert (third.kind, third.exchange, third.routing_key, third.correlation_id, third.headers, third.body,
                third.content_type, third.attempts) == (
            "reply", "", "rk.3", "c-3", {"x-n": 3}, '{"n":3,"å":"ä"}'.encode(), "application/json", 0)
        assert relay.mark_published(conn, [rows[0].id, rows[1].id]) == 2
        assert relay.mark_failed(conn, {rows[2].id: "channel closed " * 500}, max_attempts=5,
                                 retry_base_s=0) == []
        conn.commit()
        rest = relay.unpublished(conn, 10)
        assert [r.message_id for r in rest] == ["msg-3", "msg-4"]
        assert rest[0].attempts == 1
        assert relay.pending_count(conn) == 2
        assert relay.unpublished(conn, 1)[0].message_id == "msg-3"
        error = conn.execute(select(outbox.c.last_error).where(outbox.c.id == rows[2].id)).scalar_one()
        assert len(error) == relay.MAX_ERROR_LENGTH


def test_a_batch_takes_one_row_per_certificate_and_a_failed_row_holds_up_only_its_own(engine):
    _publish_everything(engine)
    with SqlUnitOfWork(engine) as uow:
        uow.outbox.add([_message(1, key="A"), _message(2, key="A"), _message(3, key="B"), _message(4, "reply"),
                        _message(5, "reply"), _message(6, key="B"), _message(7, key="C")])
        uow.commit()
    with leading(engine) as conn:
        first = relay.unpublished(conn, 10)
        assert [r.message_id for r in first] == ["msg-1", "msg-3", "msg-4", "msg-5", "msg-7"]
        by_id = {r.message_id: r.id for r in first}
        relay.mark_published(conn, [by_id["msg-3"], by_id["msg-4"], by_id["msg-5"], by_id["msg-7"]])
        relay.mark_failed(conn, {by_id["msg-1"]: "nacked"}, max_attempts=5, retry_base_s=3600)
        conn.commit()
        # msg-1 waits out its back-off, and msg-2 (same certificate) waits for it; B's next row goes on
        assert [r.message_id for r in relay.unpublished(conn, 10)] == ["msg-6"]
        assert relay.retrying(conn)


def test_a_row_that_fails_every_attempt_is_parked_until_unparked(engine):
    _publish_everything(engine)
    with SqlUnitOfWork(engine) as uow:
        uow.outbox.add([_message(1, key="P"), _message(2, key="P"), _message(3, key="Q")])
        uow.commit()
    with leading(engine) as conn:
        row = relay.unpublished(conn, 10)[0]
        assert relay.mark_failed(conn, {row.id: "nacked"}, max_attempts=2, retry_base_s=0) == []
        parked = relay.mark_failed(conn, {row.id: "nacked again"}, max_attempts=2, retry_base_s=0)
        conn.commit()
        assert [(p.id, p.message_id, p.attempts, p.error) for p in parked] == [(row.id, "msg-1", 2, "nacked again")]
        assert [r.message_id for r in relay.unpublished(conn, 10)] == ["msg-3"]  # msg-2 stays behind msg-1
        assert not relay.retrying(conn)
        assert [r.message_id for r in relay.parked_rows(conn)] == ["msg-1"] and relay.parked_count(conn) == 1
        assert relay.unpark(conn, [row.id + 1000]) == 0
        assert relay.unpark(conn, None) == 1
        conn.commit()
        again = relay.unpublished(conn, 10)
        assert [(r.message_id, r.attempts) for r in again] == [("msg-1", 0), ("msg-3", 0)]


def test_relay_statements_act_only_on_the_session_that_holds_the_lock(engine):
    _publish_everything(engine)
    with SqlUnitOfWork(engine) as uow:
        uow.outbox.add([_message(1), _message(2)])
        uow.commit()
    with leading(engine) as leader, engine.connect() as other:
        ids = [r.id for r in relay.unpublished(leader, 10)]
        leader.commit()
        assert relay.leads(leader) and not relay.leads(other)
        with pytest.raises(relay.NotLeading):
            relay.unpublished(other, 10)
        other.rollback()
        with pytest.raises(relay.NotLeading):
            relay.mark_published(other, ids)
        other.rollback()
        with pytest.raises(relay.NotLeading):
            relay.mark_failed(other, {ids[0]: "x"}, max_attempts=1)
        other.rollback()
        assert relay.pending_count(other) == 2
        assert other.execute(select(func.max(outbox.c.attempts))).scalar_one() == 0


def test_outbox_batch_stops_at_its_byte_budget_but_always_takes_the_first_row(engine):
    _publish_everything(engine)
    big = [OutboxMessage(kind="event", exchange="intyg.events", routing_key=f"rk.big.{n}", message_id=f"big-{n}",
                         body=bytes([n]) * 1000) for n in range(5)]
    with SqlUnitOfWork(engine) as uow:
        uow.outbox.add(big)
        uow.commit()
    with leading(engine) as conn:
        assert [r.message_id for r in relay.unpublished(conn, 10, max_bytes=2500)] == ["big-0", "big-1", "big-2"]
        assert [r.message_id for r in relay.unpublished(conn, 10, max_bytes=1)] == ["big-0"]
        assert [r.message_id for r in relay.unpublished(conn, 2, max_bytes=10**9)] == ["big-0", "big-1"]


def test_only_one_relay_leads(engine):
    with engine.connect() as first, engine.connect() as second:
        assert relay.try_lead(first)
        first.commit()  # a session lock outlives the transaction
        assert not relay.try_lead(second)
        assert relay.release_lead(first)
        assert relay.try_lead(second)
        assert not relay.try_lead(first)
        assert relay.release_lead(second)


# --- concurrency ------------------------------------------------------------------------------------------------
def _in_threads(*targets):
    errors: list[BaseException] = []

    def run(target):
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    if errors:
        raise errors[0]


def test_concurrent_updates_of_one_certificate_lose_nothing(engine):
    cert = certificate(statuses=[StatusChange("RECEIVED", None, NOW)])
    _store(engine, cert)
    start = threading.Barrier(2)

    def send_to(recipient: str):
        def work():
            start.wait()
            with SqlUnitOfWork(engine) as uow:
                loaded = uow.certificates.get(cert.id, for_update=True)
                time.sleep(0.2)  # hold the lock so the other one really waits
                loaded.record("SENT", dt.datetime.now(UTC), target=recipient)
                uow.certificates.save(loaded)
                uow.commit()
        return work

    _in_threads(send_to("FKASSA"), send_to("TRANSP"))
    with SqlUnitOfWork(engine) as uow:
        got = uow.certificates.get(cert.id)
    assert [s.status for s in got.statuses] == ["RECEIVED", "SENT", "SENT"]
    assert sorted(got.sent_to) == ["FKASSA", "TRANSP"]


def test_lock_patient_serialises_transactions(engine):
    holding, times = threading.Event(), {}

    def first():
        with SqlUnitOfWork(engine) as uow:
            uow.lock_patient(PATIENT)
            holding.set()
            time.sleep(0.5)
            times["first_commits"] = time.monotonic()
            uow.commit()

    def second():
        holding.wait(10)
        with SqlUnitOfWork(engine) as uow:
            uow.lock_patient(PATIENT)
            times["second_holds"] = time.monotonic()
            uow.commit()

    def other_patient():
        holding.wait(10)
        began = time.monotonic()
        with SqlUnitOfWork(engine) as uow:
            uow.lock_patient(OTHER_PATIENT)
            times["other_waited"] = time.monotonic() - began

    _in_threads(first, second, other_patient)
    assert times["second_holds"] >= times["first_commits"]
    assert times["other_waited"] < 0.4


# --- transient faults -------------------------------------------------------------------------------------------
def test_a_stuck_row_lock_is_a_transient_error(engine, storage_url):
    cert = certificate()
    _store(engine, cert)
    impatient = make_engine(storage_url, lock_timeout_ms=100)
    try:
        with SqlUnitOfWork(engine) as holder, SqlUnitOfWork(impatient) as waiter:
            holder.certificates.get(cert.id, for_update=True)
            with pytest.raises(DBAPIError) as raised:
                waiter.certificates.get(cert.id, for_update=True)
            assert is_transient(raised.value)
            assert raised.value.orig.sqlstate == "55P03"
    finally:
        impatient.dispose()


def test_statement_timeout_is_a_transient_error(storage_url):
    hasty = make_engine(storage_url, statement_timeout_ms=50)
    try:
        with hasty.connect() as conn, pytest.raises(DBAPIError) as raised:
            conn.execute(text("SELECT pg_sleep(2)"))
        assert is_transient(raised.value)
        assert raised.value.orig.sqlstate == "57014"
    finally:
        hasty.dispose()


def test_a_concurrent_register_of_one_id_is_transient_but_other_errors_are_not(engine):
    cert = certificate()
    _store(engine, cert)
    with pytest.raises(DBAPIError) as duplicate:
        _store(engine, cert)
    assert is_transient(duplicate.value)
    assert duplicate.value.orig.diag.constraint_name == "certificates_pkey"

    with pytest.raises(DBAPIError) as checked, SqlUnitOfWork(engine) as uow:
        uow.inbox.add("", "consent.set", None)
        uow.flush()
    assert not is_transient(checked.value)
    with pytest.raises(DBAPIError) as other_key, engine.begin() as conn:
        conn.execute(insert(consents), [{"patient_id": PATIENT, "given": True}] * 2)
    assert not is_transient(other_key.value)
    assert not is_transient(ValueError("bad"))


def test_a_lost_connection_is_transient(engine, storage_url):
    with engine.connect() as victim:
        pid = victim.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with engine.connect() as killer:
            killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as raised:
            victim.execute(text("SELECT 1"))
    assert is_transient(raised.value)
    # And the pool recovers: pre-ping replaces the dead connection.
    with SqlUnitOfWork(engine) as uow:
        assert uow.certificates.get("anything") is None


def test_a_one_session_connection_never_continues_on_a_new_session(engine, storage_url):
    """The relay's lock is its session's: after the session is lost, no statement may run on a fresh one."""
    conn = one_session(storage_url, application_name="one-session-test")
    try:
        assert relay.try_lead(conn)
        conn.commit()
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        conn.commit()
        with engine.connect() as killer:
            killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError):
            conn.execute(text("SELECT 1"))
        conn.rollback()  # a plain pooled Connection would reconnect at its next statement
        with pytest.raises(StatementError) as raised:
            conn.execute(text("SELECT pg_backend_pid()"))
        assert isinstance(raised.value.orig, SessionLost)
    finally:
        conn.close()


def test_every_session_carries_tcp_keepalives_on_both_ends(storage_url):
    conn = one_session(storage_url)
    try:
        shown = {name: conn.execute(text(f"SHOW {name}")).scalar_one()
                 for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count",
                              "tcp_user_timeout", "client_connection_check_interval")}
        client = conn.connection.dbapi_connection.info.get_parameters()
    finally:
        conn.close()
    assert shown == {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3",
                     "tcp_user_timeout": "30000", "client_connection_check_interval": "5s"}
    assert {k: client[k] for k in ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
                                   "tcp_user_timeout")} == {
        "keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3",
        "tcp_user_timeout": "30000"}
