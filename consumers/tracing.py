"""Traces of handled messages (W3C trace context in AMQP headers), through `opentelemetry-api` only: the SDK and
its exporter are set up by the composition root (`service.tracing`), which hands the consumers a tracer; without
one (the default) this module is not even imported (`consumers.loop`), and no span attribute is ever built.

A message's `traceparent`/`tracestate` come only from `Envelope.trace` (checked and allow-listed by
`consumers.envelope`); one the W3C propagator cannot parse is ignored and the message starts a new trace. The
handling of a message is one CONSUMER span, `process <message type>`, with the messaging semantic conventions'
attributes and nothing personal (no patient, no certificate content, no error text: a fault's message may quote
a value). Its context is what the message's reply and events carry (`headers`), so the relay publishes them, and
a recipient's delivery, as children of that span.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from consumers.envelope import Delivery, Envelope
from consumers.routes import ROUTES

# The W3C propagator itself rather than the global one: the contract keeps exactly `traceparent` and `tracestate`
# (no `baggage`, whatever OTEL_PROPAGATORS says).
W3C = TraceContextTextMapPropagator()
UNKNOWN_TYPE = "unknown"  # span names stay few: a type no route knows is not copied into one


def start(tracer: trace.Tracer, queue: str, delivery: Delivery, envelope: Envelope, batch_size: int) -> Span:
    """The span of handling one message, continuing the sender's trace when it sent a valid one."""
    kind = envelope.routing_key if envelope.routing_key in ROUTES else UNKNOWN_TYPE
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": delivery.exchange or queue,
        "messaging.destination.subscription.name": queue,
        "messaging.rabbitmq.destination.routing_key": kind,
        "messaging.message.body.size": len(envelope.body),
        "messaging.batch.message_count": batch_size,
    }
    if envelope.message_id:
        attributes["messaging.message.id"] = envelope.message_id
    if envelope.correlation_id:
        attributes["messaging.message.conversation_id"] = envelope.correlation_id
    return tracer.start_span(f"process {kind}", context=W3C.extract(envelope.trace), kind=SpanKind.CONSUMER,
                             attributes=attributes)


def headers(span: Span) -> dict[str, str]:
    """The trace context of `span` as AMQP headers, for what the message produces."""
    carrier: dict[str, str] = {}
    W3C.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def current(span: Span) -> AbstractContextManager[Any]:
    """Make `span` the active one (log lines then carry its ids)."""
    return trace.use_span(span, end_on_exit=False)


def finish(span: Span, outcome: str, *, failed: bool) -> None:
    span.set_attribute("intyg.outcome", outcome)  # OK, an INFO/ERROR code, RETRY, DUPLICATE, ...: a bounded set
    if failed:
        span.set_attribute("error.type", outcome)
        span.set_status(StatusCode.ERROR)
    span.end()
