"""Traces through the real broker and database, with the service in-process so that its spans can be read from the
SDK's in-memory exporter: a citizen's send continues the portal's trace, and the delivery in the recipient's
queue, published later by the outbox relay, carries that same trace; a malformed `traceparent` starts a new one."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service.app import Service
from service.settings import Settings
from service.testdata import random_personnummer

try:
    from tests import factories
    from tests.e2e.harness import Wire
except ImportError:  # tests/ itself on sys.path
    import factories
    from e2e.harness import Wire

pytestmark = pytest.mark.integration

PORTAL_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PORTAL_SPAN = "00f067aa0ba902b7"
PORTAL_TRACEPARENT = f"00-{PORTAL_TRACE}-{PORTAL_SPAN}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def service(amqp_url, database_url, exporter) -> Iterator[Service]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service = Service(Settings(amqp_url=amqp_url, database_url=database_url, relay_poll_s=0.05),
                      tracer_provider=provider)
    service.start(ready_timeout=30)
    try:
        yield service
    finally:
        service.stop()
        provider.shutdown()


@pytest.fixture
def wire(amqp_url) -> Iterator[Wire]:
    wire = Wire(amqp_url)
    yield wire
    wire.close()


def parts(traceparent: str) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C traceparent."""
    _version, trace_id, span_id, _flags = traceparent.split("-")
    return trace_id, span_id


def span_of(exporter: InMemorySpanExporter, message_id: str, timeout: float = 5.0):
    """The span of handling `message_id` (it ends once the message is settled, just after its reply left)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in exporter.get_finished_spans() if s.attributes.get("messaging.message.id") == message_id]
        if spans or time.monotonic() > deadline:
            [span] = spans
            return span
        time.sleep(0.02)


def test_a_citizens_send_is_one_trace_from_the_portal_to_the_recipients_delivery(service, wire, exporter):
    patient = random_personnummer()
    cid = f"trace-{uuid.uuid4()}"
    assert wire.call("certificate.register", {"certificate": factories.certificate_json(
        id=cid, patient_id=patient)})["result"] == "OK"
    assert wire.call("consent.set", {"patient_id": patient, "given": True})["result"] == "OK"
    send = wire.send("certificate.send", {"certificate_id": cid, "patient_id": patient, "recipient_id": "FKASSA",
                                          "sent_by": "CITIZEN"}, headers={"traceparent": PORTAL_TRACEPARENT,
                                                                          "tracestate": "portal=1"})
    reply = wire.reply_msg(send)
    assert reply.body["result"] == "OK", reply.body
    [delivery] = wire.take("recipient.FKASSA", count=1, timeout=15)

    span = span_of(exporter, send)
    assert span.name == "process certificate.send" and span.kind is SpanKind.CONSUMER
    assert format(span.context.trace_id, "032x") == PORTAL_TRACE  # continues the portal's trace ...
    assert format(span.parent.span_id, "016x") == PORTAL_SPAN  # ... as a child of the portal's span
    own_span = format(span.context.span_id, "016x")
    # the reply and the recipient's delivery (both published by the relay, later) are children of the handling
    assert parts(reply.headers["traceparent"]) == (PORTAL_TRACE, own_span)
    assert parts(delivery.headers["traceparent"]) == (PORTAL_TRACE, own_span)
    assert delivery.routing_key == "recipient.FKASSA.certificate.sent"
    assert delivery.headers["tracestate"] == "portal=1"
    assert [e.headers["traceparent"] for e in wire.events_where("certificate.sent")] == [
        delivery.headers["traceparent"]]


def test_a_span_carries_the_messaging_attributes_and_nothing_personal(service, wire, exporter):
    patient = random_personnummer()
    cid = f"trace-{uuid.uuid4()}"
    register = wire.send("certificate.register", {"certificate": factories.certificate_json(
        id=cid, patient_id=patient)}, correlation_id="corr-trace")
    assert wire.reply("corr-trace")["result"] == "OK"

    span = span_of(exporter, register)
    attributes = dict(span.attributes)
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == "intyg.commands"
    assert attributes["messaging.destination.subscription.name"] == "intyg.registration"
    assert attributes["messaging.rabbitmq.destination.routing_key"] == "certificate.register"
    assert attributes["messaging.message.conversation_id"] == "corr-trace"
    assert attributes["messaging.batch.message_count"] >= 1 and attributes["messaging.message.body.size"] > 0
    assert attributes["intyg.outcome"] == "OK"
    values = " ".join(str(v) for v in attributes.values())
    assert patient not in values and patient[2:] not in values
    assert factories.DOCUMENT["content"] not in values and cid not in values


def test_a_malformed_traceparent_starts_a_new_trace_and_the_service_keeps_serving(service, wire, exporter):
    broken = wire.send("recipient.list", {"certificate_type": "lisjp"},
                       headers={"traceparent": f"00-{PORTAL_TRACE}-not-a-span-id-01"})
    reply = wire.reply_msg(broken)
    assert reply.body["result"] == "OK"
    span = span_of(exporter, broken)
    assert span.parent is None and format(span.context.trace_id, "032x") != PORTAL_TRACE
    assert parts(reply.headers["traceparent"]) == (format(span.context.trace_id, "032x"),
                                                   format(span.context.span_id, "016x"))

    assert wire.call("recipient.list", {"certificate_type": "lisjp"})["result"] == "OK"


def test_a_dead_letter_keeps_the_senders_trace_context_and_its_span_is_an_error(service, wire, exporter):
    garbage = wire.send("certificate.register", b"not json", headers={"traceparent": PORTAL_TRACEPARENT})
    assert wire.reply(garbage)["code"] == "INVALID_MESSAGE"
    [letter] = wire.take("intyg.registration.dlq", count=1, timeout=10)
    assert letter.headers["traceparent"] == PORTAL_TRACEPARENT  # a replay continues the sender's trace
    span = span_of(exporter, garbage)
    assert span.status.is_ok is False and span.attributes["error.type"] == "INVALID_MESSAGE"
