"""Replies leave in one AMQP transaction per batch (publishers.replies.ReplyBatch): what a hostile requester's
reply address or message_id does to the other messages of its batch. Each test publishes a batch before the
consumer starts, so that the hostile message and the good ones are in one batch."""
from __future__ import annotations

import json
import time
import uuid

import pika
import pytest

from consumers.loop import Consumer
from consumers.metrics import LoopMetrics
from contracts.topology import COMMANDS_EXCHANGE
from service import topology
from service.settings import Settings
from storage import migrate
from storage.engine import make_engine

try:
    from tests import factories
    from tests.integration.test_loop_smoke import FAST, Requester
except ImportError:  # tests/ itself on sys.path
    import factories
    from integration.test_loop_smoke import FAST, Requester

pytestmark = pytest.mark.integration
QUEUE = "intyg.registration"


@pytest.fixture
def requester(amqp_url):
    requester = Requester(amqp_url)
    yield requester
    requester.close()


@pytest.fixture
def settings(amqp_url, database_url) -> Settings:
    settings = Settings(amqp_url=amqp_url, database_url=database_url, **FAST)
    migrate.upgrade(database_url)
    topology.declare_with(amqp_url, settings)
    return settings


def register_body() -> dict:
    return {"certificate": factories.certificate_json(id=f"hostile-{uuid.uuid4()}")}


def publish(requester: Requester, *, message_id: str, reply_to: str) -> None:
    props = pika.BasicProperties(message_id=message_id, content_type="application/json", delivery_mode=2,
                                 reply_to=reply_to)
    requester.channel.basic_publish(COMMANDS_EXCHANGE, "certificate.register", json.dumps(register_body()).encode(),
                                    props, mandatory=True)


class Refusals(LoopMetrics):
    def __init__(self) -> None:
        self.refused: list[tuple[str, int]] = []

    def replies_refused(self, queue: str, count: int) -> None:
        self.refused.append((queue, count))


def run_batch(settings, requester, hostile, metrics: LoopMetrics | None = None) -> tuple[list[str], Consumer]:
    """Two good registrations, the hostile one (`hostile(requester)` publishes it), two good ones; then a consumer."""
    requester.channel.queue_purge(QUEUE)
    goods = [requester.send("certificate.register", register_body()) for _ in range(2)]
    hostile(requester)
    goods += [requester.send("certificate.register", register_body()) for _ in range(2)]
    engine = make_engine(settings.database_url)
    consumer = Consumer(QUEUE, settings, engine, metrics=metrics or LoopMetrics())
    consumer.start()
    consumer.engine_to_dispose = engine
    return goods, consumer


def stop(consumer: Consumer) -> None:
    consumer.stop()
    consumer.join(15)
    consumer.engine_to_dispose.dispose()


def drained(requester: Requester, consumer: Consumer, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = requester.channel.queue_declare(QUEUE, passive=True).method.message_count
        if ready == 0 and consumer.handled >= 5:
            return True
        time.sleep(0.2)
    return False


def answers_every_good_message(settings, requester, hostile, metrics: LoopMetrics | None = None) -> None:
    """`run_batch`, then: every good message is answered OK and the queue drains."""
    goods, consumer = run_batch(settings, requester, hostile, metrics)
    try:
        for message_id in goods:
            assert requester.reply(message_id, timeout=10)[1]["result"] == "OK"
        assert drained(requester, consumer)
    finally:
        stop(consumer)


def test_a_reply_queue_that_refuses_every_message_harms_no_other_message_of_the_batch(settings, requester):
    refusing = requester.channel.queue_declare(
        "", exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}).method.queue
    metrics = Refusals()
    answers_every_good_message(settings, requester,
                               lambda r: publish(r, message_id=f"refused-{uuid.uuid4()}", reply_to=refusing), metrics)
    assert metrics.refused == [(QUEUE, 1)]  # counted for the operators: that requester lost its reply


def test_a_message_id_whose_reply_id_is_too_long_for_amqp_harms_no_other_message_of_the_batch(settings, requester):
    long_id = "\u20ac" * 85  # 85 characters (the contract allows 128), 255 bytes of UTF-8: "reply-" + it is 261
    goods, consumer = run_batch(settings, requester,
                                lambda r: publish(r, message_id=long_id, reply_to=r.reply_queue))
    try:
        for message_id in goods:
            assert requester.reply(message_id, timeout=10)[1]["result"] == "OK"
        properties, reply = requester.reply(long_id, timeout=10)  # answered too, its reply's id cut to fit
        assert reply["result"] == "OK" and reply["request_id"] == long_id
        assert f"reply-{long_id}".startswith(properties.message_id) and len(properties.message_id.encode()) <= 255
        assert drained(requester, consumer)
    finally:
        stop(consumer)


def publish_from_a_direct_reply_to_requester_gone(amqp_url: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.basic_consume("amq.rabbitmq.reply-to", lambda *a: None, auto_ack=True)
    channel.basic_publish(COMMANDS_EXCHANGE, "certificate.register", json.dumps(register_body()).encode(),
                          pika.BasicProperties(message_id=f"gone-{uuid.uuid4()}", reply_to="amq.rabbitmq.reply-to"))
    connection.close()


@pytest.mark.parametrize("reply_to", ["amq.rabbitmq.reply-to.garbage", "no-such-queue", "gone",
                                      "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyNzk5NjczNwAAC8MAAAAAWyY5vg=="])
def test_odd_reply_addresses_harm_no_other_message_of_the_batch(settings, requester, reply_to, amqp_url):
    if reply_to == "gone":
        hostile = lambda r: publish_from_a_direct_reply_to_requester_gone(amqp_url)  # noqa: E731
    else:
        hostile = lambda r: publish(r, message_id=f"odd-{uuid.uuid4()}", reply_to=reply_to)  # noqa: E731
    answers_every_good_message(settings, requester, hostile)


def test_a_quorum_reply_queue_gets_its_reply(settings, requester):
    name = f"quorum-replies-{uuid.uuid4()}"
    requester.channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
    message_id = f"q-{uuid.uuid4()}"
    goods, consumer = run_batch(settings, requester, lambda r: publish(r, message_id=message_id, reply_to=name))
    try:
        for good in goods:
            assert requester.reply(good, timeout=10)[1]["result"] == "OK"
        deadline = time.monotonic() + 10
        while True:
            method, properties, body = requester.channel.basic_get(name, auto_ack=True)
            if method is not None:
                break
            assert time.monotonic() < deadline, "no reply in the quorum queue"
            time.sleep(0.1)
        assert properties.correlation_id == message_id and json.loads(body)["result"] == "OK"
    finally:
        stop(consumer)
        requester.channel.queue_delete(name)


@pytest.mark.parametrize("kind", ["classic", "quorum"])
def test_a_reply_queue_deleted_between_publish_and_commit_harms_no_other_message(settings, requester, amqp_url,
                                                                               monkeypatch, kind):
    import consumers.loop
    from publishers.replies import ReplyBatch

    name = f"deleted-{kind}-{uuid.uuid4()}"
    requester.channel.queue_declare(name, durable=True, arguments={"x-queue-type": kind})

    class DeletingFirst(ReplyBatch):
        def commit(self) -> int:
            if self.pending:
                other = pika.BlockingConnection(pika.URLParameters(amqp_url))
                other.channel().queue_delete(name)
                other.close()
            return super().commit()

    monkeypatch.setattr(consumers.loop, "ReplyBatch", DeletingFirst)
    answers_every_good_message(settings, requester,
                               lambda r: publish(r, message_id=f"del-{uuid.uuid4()}", reply_to=name))
