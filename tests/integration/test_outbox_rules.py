"""What the outbox and the other growing tables keep, against a real PostgreSQL (and RabbitMQ for the relay):
events ordered by their certificate, personal data never kept once published, a purge that leaves nothing of
the certificate but its id (CONTRACT §8 Purge), and retention that removes only what is old (§8 bounded tables).

The module works in a database of its own, emptied before each test.
"""
from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from typing import Any

import pika
import pytest
from sqlalchemy import func, select, text

from consumers.pipeline import Envelope, Policy, parse, process
from contracts.topology import EVENTS_EXCHANGE, recipient_binding, recipient_queue
from publishers.relay import OutboxRelay
from service.settings import RecipientSetting, Settings
from storage.retention import HOUSEKEEPING_LOCK, Housekeeper, Retention, sweep
from storage.tables import bulk_progress, inbox, metadata, outbox
from storage.uow import SqlUnitOfWork

try:
    from tests import factories
    from tests.databases import empty_tables, migrated_engine
except ImportError:  # tests/ itself on sys.path
    import factories
    from databases import empty_tables, migrated_engine

pytestmark = pytest.mark.integration

RECIPIENT = f"R{uuid.uuid4().hex[:6].upper()}"  # a queue of this module's own
POLICY = Policy(catalogue=Settings(recipients=[
    RecipientSetting(id=RECIPIENT, name="Mottagare", certificate_types=["lisjp"])]).catalogue)
DOCUMENT_TEXT = f"<intyg>journal {uuid.uuid4().hex}</intyg>"
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def engine(database_url):
    with migrated_engine(database_url, "outbox_rules") as engine:
        yield engine


@pytest.fixture(autouse=True)
def _empty_tables(engine):
    empty_tables(engine)


def handle(engine, routing_key: str, body: dict[str, Any]) -> dict[str, Any]:
    envelope = Envelope(routing_key=routing_key, body=json.dumps(body).encode(), message_id=f"m-{uuid.uuid4()}",
                        reply_to="amq.rabbitmq.reply-to", content_type="application/json")
    with SqlUnitOfWork(engine) as uow:
        processed = process(parse(envelope, POLICY), uow, POLICY)
        uow.commit()
    assert processed.reply is not None and processed.reply.result.value == "OK", processed.reply
    return processed.reply.model_dump(mode="json")


def register_and_send(engine) -> dict[str, Any]:
    certificate = factories.certificate_json(
        id=f"intyg-{uuid.uuid4()}", document={"media_type": "application/xml", "content": DOCUMENT_TEXT})
    handle(engine, "consent.set", {"patient_id": certificate["patient_id"], "given": True})
    handle(engine, "certificate.register", {"certificate": certificate})
    return certificate


def send(engine, certificate: dict[str, Any]) -> None:
    handle(engine, "certificate.send", {"certificate_id": certificate["id"], "patient_id": certificate["patient_id"],
                                        "recipient_id": RECIPIENT, "sent_by": "CITIZEN", "care_giver_id": None})


def purge(engine, certificate: dict[str, Any]) -> None:
    """Care removes its copy (the citizen's stays, with consent), then consent is withdrawn: purged."""
    handle(engine, "certificate.remove-care-copy", {"certificate_id": certificate["id"],
                                                    "care_giver_id": certificate["issued_by"]["care_giver"]["id"],
                                                    "accessed_by": factories.ACCESSED_BY})
    handle(engine, "consent.set", {"patient_id": certificate["patient_id"], "given": False})


def outbox_of(engine, certificate_id: str) -> list:
    with engine.connect() as conn:
        return list(conn.execute(
            select(outbox.c.routing_key, outbox.c.kind, outbox.c.ordering_key, outbox.c.erase_when_published,
                   outbox.c.published_at)
            .where(func.convert_from(outbox.c.body, "UTF8").contains(certificate_id)).order_by(outbox.c.id)))


def relay_for(amqp_url, engine) -> OutboxRelay:
    return OutboxRelay(amqp_url, engine, poll_s=0.05, takeover_grace_s=0.1, retry_base_s=0.05)


@pytest.fixture
def recipient_channel(amqp_url):
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", durable=True)
    channel.queue_declare(recipient_queue(RECIPIENT), durable=True)
    channel.queue_bind(recipient_queue(RECIPIENT), EVENTS_EXCHANGE, routing_key=recipient_binding(RECIPIENT))
    channel.queue_purge(recipient_queue(RECIPIENT))
    yield channel
    channel.queue_delete(recipient_queue(RECIPIENT))
    connection.close()


# --- order and personal data --------------------------------------------------------------------------------------
def test_events_are_ordered_by_their_certificate_and_recipient_deliveries_are_marked_for_erasure(engine):
    certificate = register_and_send(engine)
    send(engine, certificate)
    rows = outbox_of(engine, certificate["id"])
    assert [(r.routing_key, r.ordering_key, r.erase_when_published) for r in rows if r.kind == "event"] == [
        ("certificate.registered", certificate["id"], False),
        ("certificate.sent", certificate["id"], False),
        (f"recipient.{RECIPIENT}.certificate.sent", certificate["id"], True)]
    with engine.connect() as conn:  # replies are published by the message loop, not through the outbox
        assert conn.execute(select(outbox.c.id).where(outbox.c.kind == "reply")).first() is None


def test_a_recipient_delivery_is_erased_as_soon_as_it_is_published(engine, amqp_url, recipient_channel):
    certificate = register_and_send(engine)
    send(engine, certificate)
    relay_for(amqp_url, engine).run_once()
    method, _, body = recipient_channel.basic_get(recipient_queue(RECIPIENT), auto_ack=True)
    assert method is not None and json.loads(body)["certificate"]["document"]["content"] == DOCUMENT_TEXT
    assert [(r.routing_key, r.published_at is not None) for r in outbox_of(engine, certificate["id"])] == [
        ("certificate.registered", True), ("certificate.sent", True)]  # kept for OUTBOX_RETENTION; no patient


def test_an_access_log_publication_names_the_patient_and_is_erased_once_published(engine, amqp_url):
    certificate = register_and_send(engine)
    handle(engine, "certificate.get-for-care", {"certificate_id": certificate["id"],
                                                "care_giver_id": certificate["issued_by"]["care_giver"]["id"],
                                                "accessed_by": factories.ACCESSED_BY})
    logged = [r for r in outbox_of(engine, certificate["id"]) if r.routing_key == "access.logged"]
    assert [r.erase_when_published for r in logged] == [True]
    relay_for(amqp_url, engine).run_once()
    assert [r.routing_key for r in outbox_of(engine, certificate["id"])] == ["certificate.registered"]


def test_a_purged_certificate_leaves_nothing_in_the_outbox_but_deliveries_decided_before_the_purge(
        engine, amqp_url, recipient_channel):
    certificate = register_and_send(engine)
    relay_for(amqp_url, engine).run_once()  # `certificate.registered` is published (and kept)
    send(engine, certificate)  # decided before the purge, not yet published when it happens
    purge(engine, certificate)

    rows = outbox_of(engine, certificate["id"])
    assert [r.routing_key for r in rows if r.kind == "event"] == [
        "certificate.sent", f"recipient.{RECIPIENT}.certificate.sent", "access.logged",
        "certificate.care-copy-removed", "certificate.purged"]  # the published `registered` went with the purge
    assert all(r.published_at is None and r.erase_when_published for r in rows if r.kind == "event")

    relay_for(amqp_url, engine).run_once()
    method, _, body = recipient_channel.basic_get(recipient_queue(RECIPIENT), auto_ack=True)
    assert method is not None and json.loads(body)["certificate"]["id"] == certificate["id"]  # still delivered
    assert [r.kind for r in outbox_of(engine, certificate["id"])] == []  # then gone, like everything of it
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            assert not conn.execute(text(f"SELECT EXISTS (SELECT 1 FROM {table.name} t "
                                         f"WHERE t::text LIKE '%' || :needle || '%')"),
                                    {"needle": DOCUMENT_TEXT}).scalar_one(), table.name


def test_a_purge_rolled_back_to_its_savepoint_erases_nothing(engine):
    certificate = register_and_send(engine)
    with SqlUnitOfWork(engine) as uow:
        stored = uow.certificates.get(certificate["id"], for_update=True)
        with pytest.raises(RuntimeError), uow.savepoint():
            uow.certificates.purge(stored, "CONSENT_WITHDRAWN", dt.datetime.now(dt.UTC))
            raise RuntimeError("this message failed")
        uow.commit()
    assert [(r.routing_key, r.erase_when_published) for r in outbox_of(engine, certificate["id"])
            if r.kind == "event"] == [("certificate.registered", False)]


# --- retention ----------------------------------------------------------------------------------------------------
def age(engine, table, column: str, ago: dt.timedelta, where) -> None:
    with engine.begin() as conn:
        conn.execute(table.update().where(where).values({column: func.now() - ago}))


def seed_inbox(engine, *message_ids: str) -> None:
    with engine.begin() as conn:
        conn.execute(inbox.insert(), [{"message_id": m, "message_type": "consent.set", "reply": None}
                                      for m in message_ids])


def remaining(engine, column) -> list:
    with engine.connect() as conn:
        return sorted(conn.execute(select(column)).scalars())


def test_inbox_entries_older_than_the_dedup_window_are_deleted_and_no_others(engine):
    seed_inbox(engine, *[f"old-{i}" for i in range(5)], "edge", "new-1", "new-2")
    age(engine, inbox, "handled_at", 8 * DAY, inbox.c.message_id.like("old-%"))
    age(engine, inbox, "handled_at", 7 * DAY - dt.timedelta(minutes=1), inbox.c.message_id == "edge")
    deleted = sweep(engine, Retention(dedup_window=7 * DAY), batch=2)  # several short batches
    assert deleted["inbox"] == 5
    assert remaining(engine, inbox.c.message_id) == ["edge", "new-1", "new-2"]


def test_finished_and_abandoned_bulk_progress_is_deleted_and_running_jobs_keep_theirs(engine):
    with engine.begin() as conn:
        conn.execute(bulk_progress.insert(), [{"message_id": m, "citizen_only": 1, "purged": 2}
                                              for m in ("finished", "running", "abandoned")])
    seed_inbox(engine, "finished")  # the last batch wrote the inbox row with the final reply
    age(engine, bulk_progress, "updated_at", 8 * DAY, bulk_progress.c.message_id == "abandoned")
    assert sweep(engine, Retention(dedup_window=7 * DAY))["bulk_progress"] == 2
    assert remaining(engine, bulk_progress.c.message_id) == ["running"]


def test_published_outbox_rows_older_than_the_retention_are_deleted_and_unpublished_ones_never(engine):
    with engine.begin() as conn:
        conn.execute(outbox.insert(), [{"kind": "event", "exchange": EVENTS_EXCHANGE, "routing_key": "certificate.x",
                                        "message_id": m, "content_type": "application/json", "body": b"{}"}
                                       for m in ("old-1", "old-2", "old-3", "recent", "unpublished", "parked")])
    age(engine, outbox, "published_at", 2 * DAY, outbox.c.message_id.like("old-%"))
    age(engine, outbox, "published_at", dt.timedelta(hours=1), outbox.c.message_id == "recent")
    age(engine, outbox, "created_at", 30 * DAY, outbox.c.message_id.in_(["unpublished", "parked"]))
    age(engine, outbox, "parked_at", 30 * DAY, outbox.c.message_id == "parked")
    assert sweep(engine, Retention(outbox_retention=DAY), batch=2)["outbox"] == 3
    assert remaining(engine, outbox.c.message_id) == ["parked", "recent", "unpublished"]


def test_retention_never_waits_for_a_row_the_hot_path_has_locked(engine):
    seed_inbox(engine, "old-locked", "old-free")
    age(engine, inbox, "handled_at", 8 * DAY, inbox.c.message_id.like("old-%"))
    with engine.connect() as busy:
        busy.execute(select(inbox).where(inbox.c.message_id == "old-locked").with_for_update())
        started = time.monotonic()
        assert sweep(engine, Retention())["inbox"] == 1
        assert time.monotonic() - started < 2  # well under the 5 s lock_timeout: skipped, not waited for
        busy.rollback()
    assert remaining(engine, inbox.c.message_id) == ["old-locked"]
    assert sweep(engine, Retention())["inbox"] == 1  # taken at the next round


def test_one_instance_deletes_at_a_time(engine):
    seed_inbox(engine, "old")
    age(engine, inbox, "handled_at", 8 * DAY, inbox.c.message_id == "old")
    with engine.connect() as other:
        other.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"),
                      {"a": HOUSEKEEPING_LOCK[0], "b": HOUSEKEEPING_LOCK[1]})  # another instance's round
        assert sweep(engine, Retention()) == {"bulk_progress": 0, "inbox": 0, "outbox": 0, "access_log": 0}
        other.rollback()
    assert sweep(engine, Retention())["inbox"] == 1


def test_the_housekeeper_logs_what_each_round_removed(engine):
    seed_inbox(engine, "old")
    age(engine, inbox, "handled_at", 8 * DAY, inbox.c.message_id == "old")
    lines: list[tuple[str, dict]] = []
    done = threading.Event()

    class Log:
        def info(self, message, **fields):
            lines.append((message, fields))
            done.set()

        warning = info

    keeper = Housekeeper(engine, Retention(), Log(), interval_s=0.05)
    keeper.start()
    try:
        assert done.wait(10)
    finally:
        keeper.stop()
        keeper.join(5)
    assert lines[0] == ("housekeeping round", {"deleted_bulk_progress": 0, "deleted_inbox": 1, "deleted_outbox": 0,
                                               "deleted_access_log": 0})


# --- operators ----------------------------------------------------------------------------------------------------
def test_operators_list_parked_rows_and_unpark_them(engine):
    from typer.testing import CliRunner

    from service.outbox_cli import outbox_app

    with engine.begin() as conn:
        conn.execute(outbox.insert(), [{"kind": "event", "exchange": EVENTS_EXCHANGE, "routing_key": f"certificate.{n}",
                                        "message_id": f"m-{n}", "content_type": "application/json", "body": b"{}",
                                        "ordering_key": "cert-1", "attempts": 10, "last_error": "nacked"}
                                       for n in range(3)])
        conn.execute(outbox.update().where(outbox.c.message_id.in_(["m-0", "m-1"])).values(parked_at=func.now()))
    runner = CliRunner()
    env = {"DATABASE_URL": engine.url.render_as_string(hide_password=False)}

    listed = runner.invoke(outbox_app, ["parked", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert [(r["message_id"], r["attempts"], r["last_error"], r["ordering_key"]) for r in json.loads(listed.output)] \
        == [("m-0", 10, "nacked", "cert-1"), ("m-1", 10, "nacked", "cert-1")]
    assert "m-0" in runner.invoke(outbox_app, ["parked"], env=env).output

    assert runner.invoke(outbox_app, ["unpark"], env=env).exit_code != 0  # nothing in particular: refused
    first_id = json.loads(listed.output)[0]["id"]
    one = runner.invoke(outbox_app, ["unpark", str(first_id)], env=env)
    assert one.exit_code == 0 and "unparked 1" in one.output
    rest = runner.invoke(outbox_app, ["unpark", "--all"], env=env)
    assert rest.exit_code == 0 and "unparked 1" in rest.output
    with engine.connect() as conn:
        assert conn.execute(select(outbox.c.message_id, outbox.c.attempts).where(outbox.c.parked_at.is_not(None))
                            ).all() == []
        assert set(conn.execute(select(outbox.c.attempts)).scalars()) == {0, 10}  # m-2 was never parked
    assert "no parked outbox rows" in runner.invoke(outbox_app, ["parked"], env=env).output
