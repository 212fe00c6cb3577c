"""A smoke test of the running service, in-process (threads), against the real broker and database: a command
gets its reply once committed, a query its reply, garbage lands in the DLQ, a revoke that never finds
its register is retried and then dead-lettered, a database that is down sends messages down the retry path, and
the service stops cleanly."""
from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pika
import pytest

from consumers.loop import Consumer
from contracts.topology import (
    COMMANDS_EXCHANGE,
    H_ATTEMPTS,
    H_DEAD_LETTERED_AT,
    H_ERROR,
    H_ERROR_CODE,
    H_ORIGINAL_ROUTING_KEY,
    dlq,
)
from service import topology
from service import app
from service.app import Service
from service.settings import Settings
from storage.engine import make_engine

try:
    from tests import factories
except ImportError:  # tests/ itself on sys.path
    import factories

pytestmark = pytest.mark.integration

FAST = {"retry_delays_s": [0.2, 0.4], "revoke_wait_s": 1.0, "relay_poll_s": 0.05, "reconnect_max_s": 2.0}


class Requester:
    """Publishes to intyg.commands with a private exclusive reply queue and waits for replies."""

    def __init__(self, amqp_url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.channel = self.connection.channel()
        self.reply_queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.replies: dict[str, tuple[Any, dict]] = {}
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)
        self.channel.confirm_delivery()

    def _on_reply(self, _ch, _method, properties, body) -> None:
        self.replies[properties.correlation_id] = (properties, json.loads(body))

    def send(self, routing_key: str, body: dict | bytes, *, message_id: str | None = None,
             **properties: Any) -> str:
        message_id = message_id or str(uuid.uuid4())
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        props = pika.BasicProperties(message_id=message_id, content_type="application/json", delivery_mode=2,
                                     reply_to=self.reply_queue, **properties)
        self.channel.basic_publish(COMMANDS_EXCHANGE, routing_key, raw, props, mandatory=True)
        return message_id

    def reply(self, correlation_id: str, timeout: float = 15.0) -> tuple[Any, dict]:
        deadline = time.monotonic() + timeout
        while correlation_id not in self.replies:
            if time.monotonic() > deadline:
                raise AssertionError(f"no reply to {correlation_id} within {timeout}s")
            self.connection.process_data_events(time_limit=0.1)
        return self.replies.pop(correlation_id)

    def dead_letter(self, queue: str, message_id: str, timeout: float = 10.0) -> tuple[Any, bytes]:
        """Take the dead letter with `message_id` out of `queue`'s DLQ (others are left there)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, properties, body = self.channel.basic_get(dlq(queue), auto_ack=False)
            if method is None:
                time.sleep(0.1)
                continue
            if properties.message_id == message_id:
                self.channel.basic_ack(method.delivery_tag)
                return properties, body
            self.channel.basic_nack(method.delivery_tag, requeue=True)
        raise AssertionError(f"{message_id} not in {dlq(queue)} within {timeout}s")

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


@pytest.fixture
def settings(amqp_url, database_url) -> Settings:
    return Settings(amqp_url=amqp_url, database_url=database_url, **FAST)


@pytest.fixture
def service(settings):
    service = Service(settings)
    service.start(ready_timeout=30)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def requester(amqp_url):
    requester = Requester(amqp_url)
    yield requester
    requester.close()


def test_register_is_answered_ok_and_a_resend_gets_the_same_answer(service, requester):
    body = {"certificate": factories.certificate_json(id=f"smoke-{uuid.uuid4()}")}
    message_id = requester.send("certificate.register", body)
    properties, reply = requester.reply(message_id)
    assert reply["result"] == "OK", reply
    assert reply["request_id"] == message_id and properties.correlation_id == message_id

    again = requester.send("certificate.register", body, message_id=message_id)
    assert requester.reply(again)[1] == reply


def test_a_query_gets_a_direct_reply(service, requester):
    message_id = requester.send("recipient.list", {"certificate_type": "lisjp"}, correlation_id="corr-1")
    properties, reply = requester.reply("corr-1")
    assert reply["result"] == "OK" and reply["request_id"] == message_id
    assert [r["id"] for r in reply["data"]["recipients"]] == ["FKASSA"]
    assert properties.message_id == f"reply-{message_id}"


def test_garbage_is_answered_and_dead_lettered(service, requester):
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    message_id = requester.send("certificate.register", b"this is not json",
                                headers={"traceparent": traceparent, "x-trace": "t-1", "CC": ["intyg.query"]})
    _, reply = requester.reply(message_id)
    assert reply["result"] == "ERROR" and reply["code"] == "INVALID_MESSAGE"
    assert reply["error_id"] == "VALIDATION_ERROR"

    properties, body = requester.dead_letter("intyg.registration", message_id)
    assert body == b"this is not json"
    headers = properties.headers
    assert headers[H_ERROR_CODE] == "INVALID_MESSAGE"
    assert headers[H_ERROR] == "body is not a JSON object"
    assert headers[H_ATTEMPTS] == 1
    assert headers[H_ORIGINAL_ROUTING_KEY] == "certificate.register"
    assert headers[H_DEAD_LETTERED_AT].endswith("Z")
    assert headers["traceparent"] == traceparent  # the allow-listed trace context is kept ...
    assert "x-trace" not in headers and "CC" not in headers  # ... and nothing else of the client's
    assert properties.reply_to == requester.reply_queue and properties.content_type == "application/json"


def test_a_revoke_that_never_finds_its_register_is_retried_then_not_found(service, requester):
    body = {"certificate_id": f"never-{uuid.uuid4()}", "patient_id": factories.PATIENT,
            "revoked_by": {"person_id": "SE2321000016-1003", "name": "Ajla Doktor"}, "reason": None,
            "accessed_by": factories.ACCESSED_BY}
    started = time.monotonic()
    message_id = requester.send("certificate.revoke", body)
    _, reply = requester.reply(message_id, timeout=20)
    assert reply["code"] == "NOT_FOUND" and reply["error_id"] == "APPLICATION_ERROR"
    assert time.monotonic() - started >= FAST["revoke_wait_s"]  # it waited for the register

    properties, _ = requester.dead_letter("intyg.status", message_id)
    assert properties.headers[H_ERROR_CODE] == "NOT_FOUND"
    assert properties.headers[H_ORIGINAL_ROUTING_KEY] == "certificate.revoke"
    assert properties.headers[H_ATTEMPTS] >= 3


def test_service_stops_cleanly(settings):
    service = Service(settings)
    service.start(ready_timeout=30)
    assert service.healthy()
    service.stop(timeout=20)
    assert not any(c.is_alive() for c in service.consumers)
    assert service._relay_thread is not None and not service._relay_thread.is_alive()


def test_the_heap_is_frozen_before_any_thread_handles_a_message(settings, monkeypatch):
    """A batch in hand when the heap is frozen would be frozen with it, and a cycle in it never freed."""
    running_at_freeze: list[str] = []
    monkeypatch.setattr(app, "settle_heap",
                        lambda: running_at_freeze.extend(t.name for t in threading.enumerate()))
    service = Service(settings)
    try:
        service.start(ready_timeout=30, freeze_heap=True)
        assert running_at_freeze, "the heap was frozen"
        assert not [name for name in running_at_freeze if name.startswith(("consumer-", "outbox-relay"))]
        assert service.consumers and all(c.consuming for c in service.consumers)
    finally:
        service.stop(timeout=20)


def test_a_database_that_is_down_means_retries_then_unavailable(amqp_url, requester):
    """No service running: one consumer of intyg.consent whose database does not answer (connection refused)."""
    settings = Settings(amqp_url=amqp_url, database_url="postgresql://postgres@127.0.0.1:9/none", **FAST)
    topology.declare_with(amqp_url, settings)
    engine = make_engine(settings.database_url)
    consumer = Consumer("intyg.consent", settings, engine)
    consumer.start()
    try:
        assert consumer.wait_consuming(15)
        message_id = requester.send("consent.set", {"patient_id": factories.PATIENT, "given": True})
        _, reply = requester.reply(message_id, timeout=30)
        assert reply["code"] == "UNAVAILABLE" and reply["error_id"] == "TECHNICAL_ERROR"
        properties, _ = requester.dead_letter("intyg.consent", message_id)
        assert properties.headers[H_ERROR_CODE] == "UNAVAILABLE"
        assert properties.headers[H_ERROR] == "database unavailable"
        assert properties.headers[H_ATTEMPTS] == len(FAST["retry_delays_s"]) + 1
        assert properties.headers[H_ORIGINAL_ROUTING_KEY] == "consent.set"
    finally:
        consumer.stop()
        consumer.join(15)
        engine.dispose()
    assert not consumer.is_alive()


def test_a_relay_in_another_process_hears_commits_through_notify(settings, requester):
    """`serve --no-relay` + `serve --relay-only`: the consumers cannot call `wake()` on the relay, so the
    commit's NOTIFY must; with polling set to a minute, only NOTIFY can make the reply arrive in seconds."""
    slow_poll = settings.model_copy(update={"relay_poll_s": 60.0})
    relay_only = Service(slow_poll, consumers=False, relay=True)
    consumers_only = Service(slow_poll, consumers=True, relay=False)
    relay_only.start(ready_timeout=30)
    consumers_only.start(ready_timeout=30)
    try:
        time.sleep(0.5)  # the relay's first round is done; from here on it only polls or hears NOTIFY
        body = {"certificate": factories.certificate_json(id=f"split-{uuid.uuid4()}")}
        message_id = requester.send("certificate.register", body)
        _, reply = requester.reply(message_id, timeout=10.0)
        assert reply["result"] == "OK", reply
    finally:
        consumers_only.stop()
        relay_only.stop()
