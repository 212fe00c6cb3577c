"""Prometheus metrics of one service process (`/metrics`, served by `service.probes`).

Names follow Prometheus conventions (base units, `_total` counters) and, where one fits, the OpenTelemetry
messaging semantic conventions: `messaging_client_consumed_messages_total` and `messaging_process_duration_seconds`
with `messaging_destination_name` (the queue) and `messaging_rabbitmq_destination_routing_key` (the message type).
Labels are bounded: a queue, a message type of the contract (anything else is "unknown"), an outcome or reply code;
never a certificate id, a message id or a patient.

Three sources:
- the message loop's hooks (`PrometheusLoopMetrics`, per message: a dictionary look-up and an increment);
- the relay's own counters (`relay.stats`), read at scrape time (`RelayCollector`), so the relay needs no hooks;
- the database (outbox backlog, oldest unpublished row, table size estimates), sampled at scrape time at most
  every `DB_SAMPLE_S` (`DatabaseCollector`), never per message.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text

from consumers.metrics import LoopMetrics
from contracts import CONTRACT_VERSION
from contracts.replies import Code
from contracts.topology import SERVICE_QUEUES

QUEUE = "messaging_destination_name"
TYPE = "messaging_rabbitmq_destination_routing_key"
KNOWN_TYPES = frozenset(t for types in SERVICE_QUEUES.values() for t in types)
OUTCOMES = frozenset({c.value for c in Code} | {"OK", "DUPLICATE", "RETRY", "WAITING", "REQUEUED", "REJECTED"})
# The OpenTelemetry semantic conventions' advice for messaging.process.duration.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
DB_SAMPLE_S = 5.0  # the database gauges are at most this old; several scrapers cost one query


def message_type(routing_key: str) -> str:
    return routing_key if routing_key in KNOWN_TYPES else "unknown"


def outcome_label(outcome: str) -> str:
    return outcome if outcome in OUTCOMES else "other"


class PrometheusLoopMetrics(LoopMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.consumed = Counter("messaging_client_consumed_messages", "Messages settled by the service, by queue, "
                                "message type and outcome (OK, a reply code, RETRY, WAITING, DUPLICATE, ...)",
                                [QUEUE, TYPE, "outcome"], registry=registry)
        self.duration = Histogram("messaging_process_duration_seconds", "Time spent handling one message (parse, "
                                  "apply, its share of the transaction), by queue and message type",
                                  [QUEUE, TYPE], buckets=DURATION_BUCKETS, registry=registry)
        self.batch_size = Histogram("intyg_consumer_batch_size", "Deliveries handled in one database transaction",
                                    [QUEUE], buckets=BATCH_BUCKETS, registry=registry)
        self.retries = Counter("intyg_consumer_transaction_retries", "Batch transactions run again: fallback (a "
                               "savepoint per message) or transient (a fault took the transaction)",
                               [QUEUE, "reason"], registry=registry)
        self.dead_letters = Counter("intyg_dead_letters", "Messages dead-lettered, by dead-letter queue and error "
                                    "code (REJECTED: the broker dead-lettered it)", [QUEUE, "error_type"],
                                    registry=registry)
        self.reconnects = Counter("intyg_consumer_reconnects", "Consumer sessions lost (broker or database "
                                  "trouble) and started again", [QUEUE], registry=registry)
        self.refused = Counter("intyg_replies_refused", "Replies a requester's queue refused (full, "
                               "reject-publish): lost for that requester, by the queue the request came from",
                               [QUEUE], registry=registry)
        self._children: dict[tuple[str, ...], Any] = {}  # labels() costs more than a dictionary look-up
        self._lock = threading.Lock()

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children[key] = metric.labels(*labels)
        return child

    def settled(self, queue: str, message_type_: str, outcome: str, seconds: float) -> None:
        kind = message_type(message_type_)
        self._child(self.consumed, queue, kind, outcome_label(outcome)).inc()
        self._child(self.duration, queue, kind).observe(seconds)

    def dead_lettered(self, dlq: str, code: str) -> None:
        self._child(self.dead_letters, dlq, outcome_label(code)).inc()

    def batch(self, queue: str, size: int) -> None:
        self._child(self.batch_size, queue).observe(size)

    def transaction_retry(self, queue: str, reason: str) -> None:
        self._child(self.retries, queue, reason).inc()

    def reconnect(self, queue: str) -> None:
        self._child(self.reconnects, queue).inc()

    def replies_refused(self, queue: str, count: int) -> None:
        self._child(self.refused, queue).inc(count)


class BuildCollector(Collector):
    def collect(self) -> Iterator[Any]:
        try:
            version = metadata.version("intygstjanst")
        except metadata.PackageNotFoundError:
            version = "unknown"
        yield InfoMetricFamily("intyg_build", "The running code", value={
            "version": version, "contract_version": CONTRACT_VERSION, "messaging_system": "rabbitmq"})


class ConsumerCollector(Collector):
    """Whether each consumer thread consumes right now (1) or is reconnecting or not started (0)."""

    def __init__(self, consumers: Callable[[], Sequence[Any]]) -> None:
        self._consumers = consumers

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily("intyg_consumer_consuming", "1 while the consumer thread consumes its queue",
                                   labels=[QUEUE, "consumer"])
        for consumer in self._consumers():
            family.add_metric([consumer.queue, str(consumer.index)], 1.0 if consumer.consuming else 0.0)
        yield family


# relay.stats field -> (metric, help, extra labels). Fields the relay does not have (yet) are left out.
RELAY_COUNTERS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("published", "intyg_outbox_relay_published", "Outbox rows published, confirmed by the broker and marked", {}),
    ("batches", "intyg_outbox_relay_batches", "Confirm windows (batches of outbox rows) settled", {}),
    ("nacked", "intyg_outbox_relay_nacks", "Publishes the broker refused (Basic.Nack); sent again", {}),
    ("unroutable_replies", "intyg_outbox_relay_returns", "Publishes the broker returned as unroutable",
     {"kind": "reply"}),
    ("unsubscribed_events", "intyg_outbox_relay_returns", "", {"kind": "event"}),
    ("recipient_queues_declared", "intyg_outbox_relay_returns", "", {"kind": "recipient"}),
    ("parked", "intyg_outbox_relay_parked", "Outbox rows set aside after failing again and again", {}),
    ("interruptions", "intyg_outbox_relay_interruptions", "Leadership terms ended by a broker or database fault",
     {}),
)


class RelayCollector(Collector):
    """The relay's own counters (`relay.stats`, written by the relay thread), read at scrape time."""

    def __init__(self, relay: Callable[[], Any]) -> None:
        self._relay = relay

    def collect(self) -> Iterator[Any]:
        relay = self._relay()
        if relay is None:
            return
        stats = relay.stats
        yield GaugeMetricFamily("intyg_outbox_relay_leader", "1 while this process's relay holds the outbox lock",
                                value=1.0 if stats.leader else 0.0)
        yield GaugeMetricFamily("intyg_outbox_relay_connected", "1 while the leading relay is connected to the "
                                "broker and publishing", value=1.0 if stats.connected else 0.0)
        families: dict[str, CounterMetricFamily] = {}
        for field, name, help_text, labels in RELAY_COUNTERS:
            value = getattr(stats, field, None)
            if value is None:
                continue
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(name, help_text, labels=list(labels))
            family.add_metric(list(labels.values()), float(value))
        yield from families.values()


_DATABASE_SAMPLE = text("""
    SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL),
           (SELECT extract(epoch FROM now() - created_at) FROM outbox WHERE published_at IS NULL
            ORDER BY id LIMIT 1),
           (SELECT reltuples FROM pg_class WHERE oid = to_regclass('inbox')),
           (SELECT reltuples FROM pg_class WHERE oid = to_regclass('outbox'))
""")


class DatabaseCollector(Collector):
    """Outbox backlog and table sizes, one query per `DB_SAMPLE_S` at most. Table sizes are the planner's estimates
    (`pg_class.reltuples`, refreshed by autovacuum), which cost nothing to read; -1 means never analysed."""

    def __init__(self, engine: Any, log: Any) -> None:
        self._engine = engine
        self._log = log
        self._lock = threading.Lock()
        self._sampled_at = float("-inf")
        self._sample: tuple[Any, ...] | None = None
        self._failing = False

    def collect(self) -> Iterator[Any]:
        sample = self._current()
        yield GaugeMetricFamily("intyg_database_up", "1 if the last sample of the service's tables succeeded (0: database "
                                "unreachable or not migrated)",
                                value=0.0 if sample is None else 1.0)
        if sample is None:
            return
        backlog, oldest_s, inbox_rows, outbox_rows = sample
        yield GaugeMetricFamily("intyg_outbox_unpublished_messages", "Outbox rows not yet published",
                                value=float(backlog))
        yield GaugeMetricFamily("intyg_outbox_oldest_unpublished_age_seconds", "Age of the oldest unpublished "
                                "outbox row (0 when none)", value=float(oldest_s or 0.0))
        tables = GaugeMetricFamily("intyg_table_rows_estimate", "Rows in the table, as the planner estimates "
                                   "them", labels=["table"])
        tables.add_metric(["inbox"], float(inbox_rows if inbox_rows is not None else -1))
        tables.add_metric(["outbox"], float(outbox_rows if outbox_rows is not None else -1))
        yield tables

    def _current(self) -> tuple[Any, ...] | None:
        with self._lock:
            if time.monotonic() - self._sampled_at >= DB_SAMPLE_S:
                self._sample = self._query()
                self._sampled_at = time.monotonic()
            return self._sample

    def _query(self) -> tuple[Any, ...] | None:
        try:
            with self._engine.connect() as conn:
                row = tuple(conn.execute(_DATABASE_SAMPLE).one())
        except Exception as exc:  # noqa: BLE001 - a metric must never fail a scrape
            if not self._failing:
                self._log.warning("metrics: cannot sample the database", error=type(exc).__name__)
            self._failing = True
            return None
        self._failing = False
        return row


def registry_for(service: Any, engine: Any) -> tuple[CollectorRegistry, PrometheusLoopMetrics]:
    """A registry of its own per service (several services in one test process must not share one); `engine` is
    a small one of the probes' own, so that a scrape never waits for a consumer's connection."""
    registry = CollectorRegistry()  # no auto_describe: registering must not run the collectors (a query)
    loop = PrometheusLoopMetrics(registry)
    registry.register(BuildCollector())
    registry.register(ConsumerCollector(lambda: service.consumers))
    registry.register(RelayCollector(lambda: service.relay))
    registry.register(DatabaseCollector(engine, service.log))
    return registry, loop


__all__ = ["PrometheusLoopMetrics", "message_type", "registry_for"]
