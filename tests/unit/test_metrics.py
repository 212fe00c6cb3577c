"""The loop's metrics keep their labels bounded: only the contract's message types and the known outcomes become
label values, whatever a client puts in a routing key."""
from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.metrics import PrometheusLoopMetrics


def test_a_routing_key_outside_the_contract_is_counted_as_unknown_and_an_odd_outcome_as_other():
    registry = CollectorRegistry()
    metrics = PrometheusLoopMetrics(registry)
    metrics.settled("intyg.unrouted", "certificate.c-7f3a91.patient-191212121212", "INVALID_MESSAGE", 0.001)
    metrics.settled("intyg.registration", "certificate.register", "OK", 0.002)
    metrics.settled("intyg.registration", "certificate.register", "something new", 0.002)
    value = registry.get_sample_value
    assert value("messaging_client_consumed_messages_total", {
        "messaging_destination_name": "intyg.unrouted", "messaging_rabbitmq_destination_routing_key": "unknown",
        "outcome": "INVALID_MESSAGE"}) == 1
    assert value("messaging_client_consumed_messages_total", {
        "messaging_destination_name": "intyg.registration",
        "messaging_rabbitmq_destination_routing_key": "certificate.register", "outcome": "other"}) == 1
    label_values = {v for metric in registry.collect() for s in metric.samples for v in s.labels.values()}
    assert not any("191212121212" in v or "c-7f3a91" in v for v in label_values)



def test_refused_replies_are_counted_by_the_queue_their_requests_came_from():
    registry = CollectorRegistry()
    metrics = PrometheusLoopMetrics(registry)
    metrics.replies_refused("intyg.registration", 2)
    metrics.replies_refused("intyg.registration", 1)
    assert registry.get_sample_value("intyg_replies_refused_total",
                                     {"messaging_destination_name": "intyg.registration"}) == 3
