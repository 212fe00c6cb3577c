"""The buffered inserts go out as binary COPYs (`storage.writes`): every column of every table that goes through
`BufferedConnection.defer` reads back as the plain INSERT the COPY replaced wrote it, a value the column refuses
fails alike, and a connection lost in the middle of a COPY is a transient fault."""
from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select, text
from sqlalchemy import exc as sa_exc

from storage.errors import is_refused_value
from storage.tables import certificate_documents, certificate_statuses, certificates, inbox, outbox
from storage.writes import BufferedConnection, insert_statement

try:
    from tests.databases import empty_tables, migrated_engine
except ImportError:
    from databases import empty_tables, migrated_engine

pytestmark = pytest.mark.integration

CONTROL = "".join(chr(c) for c in range(1, 0x20)) + "\x7f\u2028\ufeff\uffff\U0010ffff🩺 åäö \"\\"


@pytest.fixture(scope="module")
def engine(database_url):
    with migrated_engine(database_url, "copy") as engine:
        yield engine


@pytest.fixture(autouse=True)
def _empty(engine):
    empty_tables(engine)


@pytest.fixture(autouse=True)
def _always_copy(monkeypatch):
    monkeypatch.setattr(BufferedConnection, "copy_from_rows", 1)  # a row or two go by COPY too


def cert(cid: str, **over):
    row = {"id": cid, "patient_id": "19121212121", "type": "lisjp" + CONTROL, "type_version": None,
           "signed_at": dt.datetime(1, 1, 2, 0, 0, 0, 1, tzinfo=dt.timezone(dt.timedelta(hours=14))),
           "valid_from": dt.date(1, 1, 1), "valid_to": dt.date(9999, 12, 31), "care_unit_id": "u" + CONTROL,
           "care_giver_id": "g", "test_certificate": True, "fingerprint": None,
           "content": {"k": CONTROL, "n": [1, 2 ** 70, 0.1, 1e308, -0.0, True, None], "e": {}},
           "available_to_care": False, "archived": True,
           "revoked_at": dt.datetime(9999, 12, 31, 0, 59, 59, 999999, tzinfo=dt.timezone(dt.timedelta(hours=-12)))}
    row.update(over)
    return row


def write(engine, table, rows, *, copy: bool):
    with engine.connect() as raw:
        if copy:
            conn = BufferedConnection(raw)
            conn.defer(table, rows)
            conn.flush()
        else:
            raw.execute(insert_statement(table), rows)
        raw.commit()


def read(engine, table, key):
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table).order_by(*key)).all()]


def test_every_column_reads_back_as_the_insert_wrote_it(engine):
    write(engine, certificates, [cert("a"), cert("b", signed_at=dt.datetime(2024, 3, 31, 1, 59, tzinfo=dt.UTC))],
          copy=True)
    write(engine, certificates, [cert("c"), cert("d", signed_at=dt.datetime(2024, 3, 31, 1, 59, tzinfo=dt.UTC))],
          copy=False)
    write(engine, certificate_documents, [{"certificate_id": "a", "media_type": "x", "encoding": "utf-8",
                                           "content": CONTROL * 5000}], copy=True)
    write(engine, certificate_documents, [{"certificate_id": "c", "media_type": "x", "encoding": "utf-8",
                                           "content": CONTROL * 5000}], copy=False)
    for cid in ("a", "c"):
        write(engine, certificate_statuses, [{"certificate_id": cid, "position": 0, "status": "S", "target": None,
                                              "at": dt.datetime.now(dt.UTC)}], copy=cid == "a")
    write(engine, inbox, [{"message_id": "m1", "message_type": "t", "reply": None},
                          {"message_id": "m2", "message_type": "t", "reply": {"a": CONTROL}}], copy=True)
    write(engine, inbox, [{"message_id": "m3", "message_type": "t", "reply": None},
                          {"message_id": "m4", "message_type": "t", "reply": {"a": CONTROL}}], copy=False)
    out = {"kind": "event", "exchange": "e", "routing_key": "r", "message_id": "x", "correlation_id": None,
           "content_type": "application/json", "headers": {"traceparent": CONTROL}, "body": bytes(range(256)),
           "ordering_key": None, "erase_when_published": True}
    write(engine, outbox, [out], copy=True)
    write(engine, outbox, [out], copy=False)

    rows = read(engine, certificates, [certificates.c.id])
    strip = lambda r: {k: v for k, v in r.items() if k not in ("id", "registered_at")}  # noqa: E731
    assert strip(rows[0]) == strip(rows[2]) and strip(rows[1]) == strip(rows[3])
    docs = read(engine, certificate_documents, [certificate_documents.c.certificate_id])
    assert docs[0]["content"] == docs[1]["content"] == CONTROL * 5000
    replies = read(engine, inbox, [inbox.c.message_id])
    assert [r["reply"] for r in replies[:2]] == [r["reply"] for r in replies[2:]]
    boxes = read(engine, outbox, [outbox.c.id])
    assert {k: v for k, v in boxes[0].items() if k not in ("id", "created_at")} == \
        {k: v for k, v in boxes[1].items() if k not in ("id", "created_at")}


@pytest.mark.parametrize("row", [
    {"message_id": "m" * 129, "message_type": "t", "reply": None},  # varchar(128)
], ids=["varchar128"])
def test_an_overlong_value_is_a_refused_value(engine, row):
    with engine.connect() as raw:
        conn = BufferedConnection(raw)
        conn.defer(inbox, [row])
        with pytest.raises(sa_exc.DBAPIError) as raised:
            conn.flush()
        assert is_refused_value(raised.value) and conn.flush_failed


def test_an_overlong_patient_id_is_a_refused_value(engine):
    with engine.connect() as raw:
        conn = BufferedConnection(raw)
        conn.defer(certificates, [cert("z", patient_id="1" * 13)])
        with pytest.raises(sa_exc.DBAPIError) as raised:
            conn.flush()
        assert is_refused_value(raised.value)


class _KillingRow(dict):
    """A row whose values, once read by the COPY loop, terminate the backend first: the connection is lost in the
    middle of the COPY (rows before it already streamed)."""
    killer = None

    def __getitem__(self, key):
        if _KillingRow.killer is not None:
            kill, _KillingRow.killer = _KillingRow.killer, None
            kill()
        return super().__getitem__(key)


def test_the_connection_lost_in_the_middle_of_a_copy_is_transient_and_the_pool_recovers(engine):
    import time

    from storage.errors import is_transient
    from storage.uow import SqlUnitOfWork

    try:
        from tests import factories
    except ImportError:
        import factories
    with SqlUnitOfWork(engine) as uow:
        pid = uow.connection.execute(text("SELECT pg_backend_pid()")).scalar_one()

        def kill():
            with engine.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            time.sleep(0.3)

        conn = uow.connection
        rows = [{"message_id": f"m{i}", "message_type": "t" * 50_000, "reply": {"r": i}} for i in range(200)]
        _KillingRow.killer = kill
        rows[100] = _KillingRow(rows[100])
        conn.defer(inbox, rows)
        with pytest.raises(Exception) as raised:
            uow.commit()
        assert is_transient(raised.value) and uow.flush_failed, repr(raised.value)
    with SqlUnitOfWork(engine) as uow:
        assert uow.connection.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
        assert uow.inbox.get("m1") is None
