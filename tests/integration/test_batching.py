"""A batch of messages in one transaction, with buffered writes and a warm-up (storage.writes, SqlUnitOfWork.warm):
the message loop's `_handle` driven with hand-made deliveries against the real database, the broker replaced by
a recorder (what is published and what is acknowledged). What each message gets must not depend on the
batching: duplicates in one batch, a failing message in the middle, the outbox order, two transactions racing
for one certificate id, a purge racing with a register.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import threading
import uuid
from typing import Any

import pika
import pytest
from sqlalchemy import event, select, text

import storage.certificates as certificates_module
from consumers import pipeline, tracing
from consumers.loop import Consumer, Delivery
from consumers.pipeline import Envelope, Policy, parse, process
from service.settings import Settings
from storage.engine import make_engine
from storage.errors import RacedWithPurge, is_transient
from storage.tables import certificates, inbox, outbox, tombstones
from storage.uow import SqlUnitOfWork
from storage.writes import BufferedConnection

try:
    from tests import factories
    from tests.databases import empty_tables, migrated_database
except ImportError:  # tests/ itself on sys.path
    import factories
    from databases import empty_tables, migrated_database

pytestmark = pytest.mark.integration

QUEUE = "intyg.registration"
POLICY = Policy(catalogue=Settings().catalogue)
REPLY_TO = "amq.gen-test-replies"


# --- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batching_url(database_url):
    with migrated_database(database_url, "batching") as url:
        yield url


@pytest.fixture(scope="module")
def engine(batching_url):
    engine = make_engine(batching_url, pool_size=6, max_overflow=4, lock_timeout_ms=10_000)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _empty_tables(engine):
    empty_tables(engine)


class Recorder:
    """Stands in for the consumer's channel, its reply batch and its direct publisher."""

    def __init__(self) -> None:
        self.acked: list[tuple[int, bool]] = []
        self.nacked: list[int] = []
        self.rejected: list[tuple[int, bool]] = []
        self.replies: list[tuple[str, Any]] = []
        self.reply_tos: list[str] = []
        self.reply_headers: list[Any] = []
        self.copies: list[tuple[str, bytes, Any]] = []
        self.commits = 0  # reply transactions
        self.acked_after_commit = True

    # channel
    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        if self.replies and not self.commits:
            self.acked_after_commit = False
        self.acked.append((delivery_tag, multiple))

    def basic_nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        self.nacked.append(delivery_tag)

    def basic_reject(self, delivery_tag: int, requeue: bool = True) -> None:
        self.rejected.append((delivery_tag, requeue))

    # reply batch
    def add(self, reply_to: str, reply: Any, *, correlation_id: str | None, headers: Any = None) -> None:
        self.replies.append((correlation_id or "", reply))
        self.reply_tos.append(reply_to)
        self.reply_headers.append(headers)

    def commit(self) -> None:
        self.commits += 1

    # publisher

    def copy(self, queue: str, body: bytes, properties: Any) -> None:
        self.copies.append((queue, body, properties))

    def retried(self) -> list[str]:
        return [props.message_id for queue, _body, props in self.copies if ".retry." in queue]

    def dead_lettered(self) -> list[str]:
        return [props.message_id for queue, _body, props in self.copies if queue.endswith(".dlq")]


def consumer(engine, batching_url) -> tuple[Consumer, Recorder]:
    settings = Settings(database_url=batching_url, amqp_url="amqp://guest:guest@127.0.0.1:5672/%2F",
                        retry_delays_s=[0.1, 0.2, 0.5])
    worker = Consumer(QUEUE, settings, engine)
    recorder = Recorder()
    worker._channel = worker._publisher = worker._replies = recorder
    return worker, recorder


_tags = iter(range(1, 1_000_000))


def delivery(body: dict[str, Any] | bytes, message_id: str | None = None, *,
             routing_key: str = "certificate.register") -> Delivery:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    props = pika.BasicProperties(message_id=message_id or f"msg-{uuid.uuid4()}", reply_to=REPLY_TO,
                                 content_type="application/json", delivery_mode=2)
    return Delivery(next(_tags), "intyg.commands", routing_key, props, raw)


def register_body(**overrides: Any) -> dict[str, Any]:
    return {"certificate": factories.certificate_json(id=f"cert-{uuid.uuid4()}", **overrides)}


def patient(n: int) -> str:
    return factories.personnummer(dt.date(1960, 1, 1) + dt.timedelta(days=n), 100 + n % 800)


def outbox_rows(engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.id, outbox.c.kind, outbox.c.routing_key, outbox.c.message_id,
                                   outbox.c.correlation_id, outbox.c.body).order_by(outbox.c.id)).all()
    return [{**r._asdict(), "body": json.loads(bytes(r.body))} for r in rows]


def replies_by_request(*recorders: Recorder) -> dict[str, list[dict[str, Any]]]:
    """What was answered, by request, as the requester reads it."""
    found: dict[str, list[dict[str, Any]]] = {}
    for recorder in recorders:
        assert recorder.acked_after_commit, "a delivery was acknowledged before its reply was with the broker"
        for correlation_id, reply in recorder.replies:
            found.setdefault(correlation_id, []).append(reply.model_dump(mode="json"))
    return found


def count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(text("count(*)")).select_from(table)).scalar_one()


class Statements:
    """Counts the SQL statements an engine sends (executemany = 1), and the buffered inserts (a COPY or an
    executemany per table: "BUFFERED"), which go to psycopg straight, past SQLAlchemy's events."""

    def __init__(self, engine) -> None:
        self.engine, self.seen = engine, []

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        self._insert = BufferedConnection._insert

        def insert(connection, table, rows):
            self.seen.append("BUFFERED")
            return self._insert(connection, table, rows)

        BufferedConnection._insert = insert
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)
        BufferedConnection._insert = self._insert

    def _seen(self, _conn, _cursor, statement, _params, _context, _executemany) -> None:
        self.seen.append(statement.split(None, 1)[0].upper())


# --- a batch ----------------------------------------------------------------------------------------------------
def test_a_batch_of_new_registrations_is_one_transaction_of_a_few_statements(engine, batching_url):
    worker, recorder = consumer(engine, batching_url)
    batch = [delivery(register_body(patient_id=patient(n))) for n in range(30)]
    with Statements(engine) as statements:
        worker._handle(batch)
    replies = replies_by_request(recorder)
    assert [replies[d.properties.message_id][0]["result"] for d in batch] == ["OK"] * 30
    assert recorder.acked == [(batch[-1].tag, True)] and not recorder.copies
    assert count(engine, certificates) == count(engine, inbox) == 30
    # warm-up, one COPY per table, the purge check, commit: no statement per message
    assert len(statements.seen) < 30, statements.seen
    assert statements.seen.count("BUFFERED") == 5, statements.seen  # certificates, documents, statuses, inbox, outbox
    # the warm-up and the purge check (the NOTIFY for a relay in another process rides the inserts' pipeline)
    assert statements.seen.count("SELECT") == 2, statements.seen


def test_two_registers_of_one_id_in_one_batch_same_content_is_already_exists(engine, batching_url):
    worker, recorder = consumer(engine, batching_url)
    body = register_body()
    first, second = delivery(body), delivery(copy.deepcopy(body))
    worker._handle([first, second])
    replies = replies_by_request(recorder)
    assert replies[first.properties.message_id][0]["result"] == "OK"
    assert replies[second.properties.message_id][0]["code"] == "ALREADY_EXISTS"
    assert count(engine, certificates) == 1
    events = [r for r in outbox_rows(engine) if r["kind"] == "event"]
    assert [e["routing_key"] for e in events] == ["certificate.registered"]


def test_two_registers_of_one_id_in_one_batch_other_content_is_a_conflict(engine, batching_url):
    worker, recorder = consumer(engine, batching_url)
    body = register_body()
    other = copy.deepcopy(body)
    other["certificate"]["document"]["content"] = "<intyg>ändrat</intyg>"
    first, second = delivery(body), delivery(other)
    worker._handle([first, second])
    replies = replies_by_request(recorder)
    assert replies[first.properties.message_id][0]["result"] == "OK"
    assert replies[second.properties.message_id][0]["code"] == "CONFLICT"
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT content FROM certificate_documents")).scalars().all()
    assert stored == [body["certificate"]["document"]["content"]]


def test_a_duplicate_message_id_in_one_batch_gets_the_same_reply_and_no_second_effect(engine, batching_url):
    worker, recorder = consumer(engine, batching_url)
    body = register_body()
    first = delivery(body, "dup-1")
    again = delivery(copy.deepcopy(body), "dup-1")
    worker._handle([first, delivery(register_body()), again])
    replies = replies_by_request(recorder)["dup-1"]
    assert len(replies) == 2 and replies[0] == replies[1] and replies[0]["result"] == "OK"
    assert count(engine, certificates) == 2 and count(engine, inbox) == 2
    events = [r for r in outbox_rows(engine) if r["kind"] == "event"]
    assert len(events) == 2
    assert recorder.acked == [(again.tag, True)]


def test_an_invalid_message_in_the_middle_is_dead_lettered_and_the_rest_of_the_batch_lands(engine, batching_url):
    worker, recorder = consumer(engine, batching_url)
    before = [delivery(register_body()) for _ in range(3)]
    unknown_field = delivery({**register_body(), "extra": 1})
    bad_patient = delivery(register_body(patient_id="191212121213"))  # wrong check digit
    unknown_type = delivery(register_body(type="no-such-type"))  # refused by the rules: an answer, not a DLQ
    after = [delivery(register_body()) for _ in range(3)]
    worker._handle([*before, unknown_field, bad_patient, unknown_type, *after])

    replies = replies_by_request(recorder)
    for d in before + after:
        assert replies[d.properties.message_id][0]["result"] == "OK"
    assert replies[unknown_type.properties.message_id][0]["code"] == "UNKNOWN_CERTIFICATE_TYPE"
    assert replies[unknown_field.properties.message_id][0]["code"] == "INVALID_MESSAGE"
    assert replies[bad_patient.properties.message_id][0]["code"] == "INVALID_PERSONNUMMER"
    assert sorted(recorder.dead_lettered()) == sorted([unknown_field.properties.message_id,
                                                       bad_patient.properties.message_id])
    assert count(engine, certificates) == 6
    assert recorder.acked == [(after[-1].tag, True)]


def hostile(message_id: Any = None, **properties: Any) -> Delivery:
    props = pika.BasicProperties(message_id=message_id or f"msg-{uuid.uuid4()}", content_type="application/json",
                                 **properties)
    return Delivery(next(_tags), "intyg.commands", "certificate.register", props, json.dumps(register_body()).encode())


def test_hostile_properties_harm_only_their_own_message(engine, batching_url):
    """Defects 3 and 4 of issue 6: a message_id that is not UTF-8 (pika hands it over as bytes) or holds NUL
    used to wedge the consumer or fault the whole batch; a reply_to naming a recipient's queue would have made the
    service publish into it."""
    worker, recorder = consumer(engine, batching_url)
    good = [delivery(register_body()) for _ in range(2)]
    bad = [hostile(b"\xff\xfe", reply_to=REPLY_TO), hostile("nul\x00id", reply_to=REPLY_TO),
           hostile(reply_to="recipient.FKASSA"), hostile(correlation_id=b"\xc3\x28", reply_to=REPLY_TO)]
    worker._handle([good[0], *bad, good[1]])

    replies = replies_by_request(recorder)
    assert all(replies[d.properties.message_id][0]["result"] == "OK" for d in good)
    assert count(engine, certificates) == 2
    assert recorder.retried() == [] and len(recorder.dead_lettered()) == 4
    assert set(recorder.reply_tos) == {REPLY_TO}  # nothing to recipient.FKASSA
    direct = [reply for _, reply in recorder.replies if reply.code is not None]
    assert [r.code.value for r in direct] == ["INVALID_MESSAGE"] * 3
    assert {r.request_id for r in direct} == {"", bad[3].properties.message_id}
    assert recorder.acked == [(good[1].tag, True)] and not recorder.rejected


def test_a_settlement_that_cannot_be_published_rejects_only_its_message(engine, batching_url):
    worker, recorder = consumer(engine, batching_url)
    good = [delivery(register_body()) for _ in range(2)]
    broken = delivery(b"not json")
    real_copy = recorder.copy

    def copy(queue, body, properties):
        if properties.message_id == broken.properties.message_id:
            raise ValueError("cannot encode")
        real_copy(queue, body, properties)

    recorder.copy = copy
    worker._handle([good[0], broken, good[1]])
    assert recorder.rejected == [(broken.tag, False)]  # the broker dead-letters it to the queue's DLQ
    assert sorted(recorder.acked) == sorted([(good[0].tag, False), (good[1].tag, False)])
    assert count(engine, certificates) == 2


INSERT_FORMS = pytest.mark.parametrize("copy_from_rows", [1, 1_000_000], ids=["copy", "executemany"])


@INSERT_FORMS
@pytest.mark.parametrize("send_after_rows", [256, 4], ids=["flushed-at-commit", "sent-while-later-ones-run"])
def test_a_message_whose_insert_fails_at_the_flush_fails_alone(engine, batching_url, monkeypatch, send_after_rows,
                                                               copy_from_rows):
    monkeypatch.setattr(BufferedConnection, "copy_from_rows", copy_from_rows)
    """The error only shows when the batch's inserts are flushed (at commit, or while a later message runs): the
    loop runs the batch again with a savepoint per message, flushed at its end, which pins the failure on the
    message that caused it."""
    monkeypatch.setattr(BufferedConnection, "send_after_rows", send_after_rows)
    worker, recorder = consumer(engine, batching_url)
    good = [delivery(register_body()) for _ in range(4)]
    broken = delivery(register_body())
    broken_id = json.loads(broken.body)["certificate"]["id"]
    real_insert_rows = certificates_module.insert_rows

    def insert_rows(connection, table, rows):
        if table is certificates and rows[0]["id"] == broken_id:
            rows = [{**rows[0], "patient_id": "1" * 13}]  # char(12): value too long, a data error
        real_insert_rows(connection, table, rows)

    monkeypatch.setattr(certificates_module, "insert_rows", insert_rows)
    savepoints = []
    real_savepoint = SqlUnitOfWork.savepoint
    monkeypatch.setattr(SqlUnitOfWork, "savepoint", lambda self: (savepoints.append(1), real_savepoint(self))[1])
    worker._handle([good[0], good[1], broken, good[2], good[3]])

    assert savepoints, "fell back to a savepoint per message"
    replies = replies_by_request(recorder)
    assert all(replies[d.properties.message_id][0]["result"] == "OK" for d in good)
    assert [r["code"] for r in replies[broken.properties.message_id]] == ["INVALID_MESSAGE"]
    # a value the database refuses would be refused again: dead-lettered at once, never retried
    assert recorder.retried() == [] and recorder.dead_lettered() == [broken.properties.message_id]
    assert count(engine, certificates) == 4 and count(engine, inbox) == 4


@INSERT_FORMS
def test_the_outbox_keeps_the_order_of_the_messages_across_a_batch(engine, batching_url, monkeypatch, copy_from_rows):
    monkeypatch.setattr(BufferedConnection, "copy_from_rows", copy_from_rows)
    monkeypatch.setattr(BufferedConnection, "send_after_rows", 16)  # many sends (COPYs) in one transaction
    worker, _ = consumer(engine, batching_url)
    batch = [delivery(register_body(patient_id=patient(n))) for n in range(40)]
    worker._handle(batch)
    rows = outbox_rows(engine)
    expected = [("event", json.loads(d.body)["certificate"]["id"]) for d in batch]
    assert [(r["kind"], r["body"]["certificate_id"]) for r in rows] == expected
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)


# --- the unit of work: read-your-writes and the warm-up ----------------------------------------------------------
def _parsed(body: dict[str, Any], message_id: str | None = None) -> pipeline.Parsed:
    return parse(Envelope(routing_key="certificate.register", body=json.dumps(body).encode(),
                          message_id=message_id or f"msg-{uuid.uuid4()}", reply_to=REPLY_TO,
                          content_type="application/json"), POLICY)


def test_reads_see_the_buffered_writes_of_their_own_transaction(engine):
    cert = factories.certificate(statuses=[("RECEIVED", None, factories.SIGNED_AT)])
    with SqlUnitOfWork(engine) as uow:
        uow.warm(["m-1"], [cert.id])
        assert uow.inbox.get("m-1") is None and uow.certificates.get(cert.id) is None
        uow.certificates.add(cert)
        uow.inbox.add("m-1", "certificate.register", {"result": "OK"})
        got = uow.certificates.get(cert.id, with_document=True)
        assert got is not None and got.document == cert.document and len(got.statuses) == 1
        assert uow.inbox.get("m-1")["reply"] == {"result": "OK"}
        assert not uow.certificates.is_purged(cert.id)
        uow.certificates.purge(got, "CONSENT_WITHDRAWN", factories.SIGNED_AT)
        assert uow.certificates.is_purged(cert.id) and uow.certificates.get(cert.id) is None
        uow.rollback()
    assert count(engine, certificates) == count(engine, tombstones) == count(engine, inbox) == 0


def test_a_rolled_back_savepoint_takes_its_buffered_writes_with_it(engine):
    kept, dropped = factories.certificate(), factories.certificate()
    with SqlUnitOfWork(engine) as uow:
        with uow.savepoint():
            uow.certificates.add(kept)
        with pytest.raises(ZeroDivisionError), uow.savepoint():
            uow.certificates.add(dropped)
            1 / 0
        uow.commit()
    with engine.connect() as conn:
        assert conn.execute(select(certificates.c.id)).scalars().all() == [kept.id]


# --- racing transactions ----------------------------------------------------------------------------------------
def _register_in(uow: SqlUnitOfWork, parsed: pipeline.Parsed) -> pipeline.Processed:
    uow.warm([parsed.message_id], [pipeline.subject(parsed)])
    return process(parsed, uow, POLICY)


@pytest.mark.parametrize("same_content", [True, False])
def test_a_concurrent_register_of_one_id_loses_on_the_key_and_its_retry_answers(engine, same_content):
    body = register_body()
    other = copy.deepcopy(body)
    if not same_content:
        other["certificate"]["document"]["content"] = "<intyg>annat</intyg>"
    winner_msg, loser_msg = _parsed(body), _parsed(other)
    loser_error: list[BaseException] = []
    loser_flushing = threading.Event()

    with SqlUnitOfWork(engine) as winner:
        assert _register_in(winner, winner_msg).reply.result.value == "OK"
        winner.flush()  # the row is in, not committed: the loser's insert of the same key has to wait for us

        def lose() -> None:
            with SqlUnitOfWork(engine) as loser:
                assert _register_in(loser, loser_msg).reply.result.value == "OK"  # it saw nothing yet
                loser_flushing.set()
                try:
                    loser.commit()
                except Exception as exc:  # noqa: BLE001
                    loser_error.append(exc)

        thread = threading.Thread(target=lose)
        thread.start()
        assert loser_flushing.wait(10)
        thread.join(0.5)
        assert thread.is_alive(), "the loser waits for the winner's uncommitted key"
        winner.commit()
    thread.join(10)
    assert len(loser_error) == 1 and is_transient(loser_error[0])

    with SqlUnitOfWork(engine) as retry:  # the retry (a new transaction) reads the winner's row
        reply = _register_in(retry, loser_msg).reply
        retry.commit()
    assert reply.code.value == ("ALREADY_EXISTS" if same_content else "CONFLICT")
    assert count(engine, certificates) == 1


def test_two_consumers_registering_one_id_at_once_one_wins_the_other_answers_after_its_retry(engine, batching_url):
    """Two consumer threads on intyg.registration, each with a batch holding the same certificate: the loser's
    flush fails on the key once the winner commits; its message is either answered in the same delivery (the
    batch runs again with savepoints and sees the winner's row) or goes down the retry path, and its retry
    answers ALREADY_EXISTS."""
    body = register_body()
    (a, rec_a), (b, rec_b) = consumer(engine, batching_url), consumer(engine, batching_url)
    batch_a = [delivery(register_body()) for _ in range(5)] + [delivery(body)]
    batch_b = [delivery(copy.deepcopy(body))] + [delivery(register_body()) for _ in range(5)]
    threads = [threading.Thread(target=a._handle, args=(batch_a,)), threading.Thread(target=b._handle, args=(batch_b,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    same = [batch_a[-1], batch_b[0]]
    recorders = [rec_a, rec_b]
    for recorder in (rec_a, rec_b):  # anything retried comes back to the queue and runs again
        for queue, raw, props in list(recorder.copies):
            assert ".retry." in queue, queue
            again = Delivery(next(_tags), "", QUEUE, props, raw)
            retrier, retrier_recorder = consumer(engine, batching_url)
            retrier._handle([again])
            recorders.append(retrier_recorder)
    replies = replies_by_request(*recorders)
    answers = sorted(replies[d.properties.message_id][0]["code"] or "OK" for d in same)
    assert answers == ["ALREADY_EXISTS", "OK"]
    assert count(engine, certificates) == 11


def test_a_register_racing_with_a_purge_of_the_same_id_never_brings_it_back(engine):
    """Between our warm-up (no row, no tombstone) and our insert, another transaction registered the id and
    purged it: our insert succeeds (the row it deleted no longer conflicts), so the check after the insert must
    see the tombstone and give the transaction up; the retry answers PURGED."""
    parsed = _parsed(register_body())
    cid = pipeline.subject(parsed)
    with SqlUnitOfWork(engine) as uow:
        _register_in(uow, parsed)
        with engine.begin() as other:  # registered and purged meanwhile, committed
            other.execute(tombstones.insert().values(certificate_id=cid, purged_at=factories.SIGNED_AT,
                                                     reason="CONSENT_WITHDRAWN"))
        with pytest.raises(RacedWithPurge) as raised:
            uow.commit()
        assert is_transient(raised.value) and uow.flush_failed
    with SqlUnitOfWork(engine) as retry:
        reply = _register_in(retry, parsed).reply
        retry.commit()
    assert reply.code.value == "PURGED"
    assert count(engine, certificates) == 0


@INSERT_FORMS
def test_a_connection_lost_between_inserts_is_transient_and_the_pool_recovers(engine, monkeypatch, copy_from_rows):
    monkeypatch.setattr(BufferedConnection, "copy_from_rows", copy_from_rows)
    monkeypatch.setattr(BufferedConnection, "send_after_rows", 1)  # every insert goes out at once
    with SqlUnitOfWork(engine) as uow:
        pid = uow.connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        uow.certificates.add(factories.certificate())  # sent at once
        with engine.connect() as killer:
            killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(Exception) as raised:
            uow.certificates.add(factories.certificate())
            uow.commit()
        assert is_transient(raised.value) and uow.flush_failed
    with SqlUnitOfWork(engine) as uow:  # a fresh connection, not the dead one
        assert uow.connection.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
        assert uow.certificates.get("anything") is None
    assert count(engine, certificates) == 0


def test_with_tracing_off_no_span_is_started_and_the_senders_trace_context_goes_on_as_it_came(
        engine, batching_url, monkeypatch):
    def no_spans(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a span was started (and its attributes built) with tracing off")

    monkeypatch.setattr(tracing, "start", no_spans)
    monkeypatch.setattr(tracing, "headers", no_spans)
    worker, recorder = consumer(engine, batching_url)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    message = delivery(register_body(patient_id=patient(7)))
    message.properties.headers = {"traceparent": traceparent}
    worker._handle([message])
    with engine.connect() as conn:
        event_headers = conn.execute(select(outbox.c.headers).where(outbox.c.kind == "event")).scalar_one()
    assert event_headers == {"traceparent": traceparent} and recorder.reply_headers == [{"traceparent": traceparent}]
    assert recorder.acked == [(message.tag, True)]
