"""Traces end to end through `intygstjanst serve` (a subprocess, so only what reaches the wire and the log is
seen here; the spans themselves are checked in tests/integration/test_tracing.py): the recipient's delivery
carries the citizen's trace, with tracing off (passed on as it came) and on; a collector that is not there costs
dropped spans and one log line, never an answer."""
from __future__ import annotations

import socket

import pytest

try:
    from tests.e2e.common import certificate, check_reply
    from tests.e2e.harness import new_id, new_patient
except ImportError:  # tests/ itself on sys.path
    from e2e.common import certificate, check_reply
    from e2e.harness import new_id, new_patient

pytestmark = pytest.mark.integration

PORTAL_TRACE = "0af7651916cd43dd8448eb211c80319c"
PORTAL_TRACEPARENT = f"00-{PORTAL_TRACE}-b7ad6b7169203331-01"
NOT_EXPORTED = "traces not exported; spans are dropped until the collector answers"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the probe is closed


def _send_to_fkassa(wire, traceparent: str):
    cid, p = new_id(), new_patient()
    check_reply(wire, wire.send("certificate.register", {"certificate": certificate(cid, p)}), "OK")
    check_reply(wire, wire.send("consent.set", {"patient_id": p, "given": True}), "OK")
    send = wire.send("certificate.send", {"certificate_id": cid, "patient_id": p, "recipient_id": "FKASSA",
                                          "sent_by": "CITIZEN"}, headers={"traceparent": traceparent})
    check_reply(wire, send, "OK")
    [delivery] = wire.take("recipient.FKASSA", count=1, timeout=15)
    return send, wire.reply_msg(send), delivery


def test_with_tracing_off_the_recipients_delivery_carries_the_citizens_traceparent_as_it_came(launch, wire):
    launch()
    _, reply, delivery = _send_to_fkassa(wire, PORTAL_TRACEPARENT)
    assert delivery.headers["traceparent"] == PORTAL_TRACEPARENT
    assert reply.headers["traceparent"] == PORTAL_TRACEPARENT


def test_an_unreachable_collector_drops_spans_says_so_once_and_never_holds_up_an_answer(launch, wire):
    # one consumer process: "once" is once per process that exports
    service = launch(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
                     OTEL_BSP_SCHEDULE_DELAY="50", OTEL_EXPORTER_OTLP_TIMEOUT="1", CONSUMER_PROCESSES="1")
    send, reply, delivery = _send_to_fkassa(wire, PORTAL_TRACEPARENT)
    trace_id, parent = delivery.headers["traceparent"].split("-")[1:3]
    assert trace_id == PORTAL_TRACE and parent != "b7ad6b7169203331"  # a child of the service's own span
    assert reply.headers["traceparent"] == delivery.headers["traceparent"]
    [handled] = [line for line in service.log_lines() if line.get("message_id") == send]
    assert handled["trace_id"] == PORTAL_TRACE and handled["span_id"] == parent  # the log line joins the trace

    service.wait_log(NOT_EXPORTED)
    for _ in range(3):  # more spans for the dead collector: still answered at once
        _send_to_fkassa(wire, PORTAL_TRACEPARENT)
    wire.pump(1.0)
    lines = service.log_lines()
    assert [line["event"] for line in lines].count(NOT_EXPORTED) == 1
    assert not any("opentelemetry" in line.get("logger", "") for line in lines)
