"""The supervised serve's one /metrics: the children's expositions merged (service/family_probes.py)."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.family_probes import merge_expositions

CONSUMERS = """# HELP messages_total Messages handled.
# TYPE messages_total counter
messages_total{queue="intyg.registration"} 5.0
# HELP backlog Outbox rows not yet published.
# TYPE backlog gauge
backlog 7.0
"""
ORDER_FREE = """# HELP messages_total Messages handled.
# TYPE messages_total counter
messages_total{queue="intyg.registration"} 3.0
messages_total{queue="intyg.query"} 2.0
# HELP backlog Outbox rows not yet published.
# TYPE backlog gauge
backlog 6.0
"""
RELAY = """# HELP relay_leader 1 while this process leads.
# TYPE relay_leader gauge
relay_leader 1.0
"""


def samples(exposition: bytes) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(exposition.decode()) for s in family.samples}


def test_what_the_children_count_is_summed_and_a_gauge_is_taken_from_the_first_that_has_it():
    merged = samples(merge_expositions([CONSUMERS, ORDER_FREE, RELAY]))
    assert merged == {
        ("messages_total", frozenset({("queue", "intyg.registration")})): 8.0,
        ("messages_total", frozenset({("queue", "intyg.query")})): 2.0,
        ("backlog", frozenset()): 7.0,
        ("relay_leader", frozenset()): 1.0,
    }


def test_no_child_answering_is_an_empty_exposition():
    assert samples(merge_expositions([])) == {}
