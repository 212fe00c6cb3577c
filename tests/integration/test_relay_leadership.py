"""Two relays on one database while the leader's database session is killed again and again under load: no row is
ever published by two relays in overlapping leadership terms.

How the evidence is built
- Each relay publishes to a vhost of its own (same broker, same database): a delivery's vhost says which relay
  published it, without any marker on the wire. A consumer per vhost records every delivery with its arrival
  time.
- A writer commits outbox rows without pause (message ids in order, 40 certificates as ordering keys); a killer
  terminates the lock holder's backend (`pg_terminate_backend`) every two seconds, so leadership moves back and
  forth.
- Merged by arrival time, the deliveries fall into runs of one relay. A run is one leadership term (or several
  of one relay in a row): if two relays ever published in overlapping terms, their deliveries would interleave
  and there would be more runs than terms. So: runs <= terms begun, and between two runs of different relays
  there is a gap.
- Duplicates are told apart: a message id delivered twice by one relay is that leader's at-least-once re-send
  (its term ended before it could mark a confirmed batch, and it led again); one delivered by both relays must
  come from two different runs (the first relay published and was confirmed but lost its session before marking,
  and its successor published it again, later). Nothing is lost, and a certificate's events keep their order.
"""
from __future__ import annotations

import threading
import time
import uuid

import pika
import pytest
from sqlalchemy import text

from contracts.topology import EVENTS_EXCHANGE
from publishers.relay import OutboxRelay
from storage.outbox import RELAY_LOCK, OutboxMessage, SqlOutbox, pending_count

try:
    from tests.databases import migrated_engine
except ImportError:  # tests/ itself on sys.path
    from databases import migrated_engine

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KILLS = 6
CERTIFICATES = 40
GRACE_S = 1.0


@pytest.fixture(scope="module")
def engine(database_url):
    with migrated_engine(database_url, "leadership") as engine:
        yield engine


class Deliveries(threading.Thread):
    """Consumes a queue bound to the test's events in one vhost and records (arrival time, vhost, message id)."""

    def __init__(self, url: str, name: str, tag: str, record: list, lock: threading.Lock) -> None:
        super().__init__(daemon=True)
        self.url, self.name, self.record, self.lock = url, name, record, lock
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = self.connection.channel()
        channel.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", durable=True)
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, EVENTS_EXCHANGE, routing_key=f"certificate.{tag}.#")
        channel.basic_consume(queue, self._on_message, auto_ack=True)
        self.stopped = threading.Event()

    def _on_message(self, _channel, _method, properties, _body) -> None:
        with self.lock:
            self.record.append((time.monotonic(), self.name, properties.message_id))

    def run(self) -> None:
        while not self.stopped.is_set():
            self.connection.process_data_events(time_limit=0.05)
        self.connection.close()


def lock_holder(engine) -> tuple[int, str] | None:
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT l.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.classid = :a AND l.objid = :b AND l.granted "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
            {"a": RELAY_LOCK[0], "b": RELAY_LOCK[1]}).first()
    return None if row is None else (row.pid, row.application_name)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_two_relays_never_publish_in_overlapping_terms_while_the_leaders_session_is_killed(
        engine, amqp_url, fresh_vhost):
    tag = uuid.uuid4().hex[:8]
    record: list[tuple[float, str, str]] = []
    record_lock = threading.Lock()
    consumers = [Deliveries(amqp_url, "A", tag, record, record_lock),
                 Deliveries(fresh_vhost, "B", tag, record, record_lock)]
    for consumer in consumers:
        consumer.start()
    # A killed relay waits 1 s before it asks for the lock again; the other asks every 0.1 s: leadership moves.
    relays = {name: OutboxRelay(url, engine, batch_size=100, poll_s=0.02, lead_poll_s=0.1, backoff_initial_s=1.0,
                                backoff_max_s=1.0, takeover_grace_s=GRACE_S, connection_name=f"relay-{name}-{tag}")
              for name, url in (("A", amqp_url), ("B", fresh_vhost))}
    threads = [threading.Thread(target=relay.run, daemon=True) for relay in relays.values()]
    for thread in threads:
        thread.start()

    written: list[str] = []
    writing = threading.Event()
    writing.set()

    def writer() -> None:
        n = 0
        while writing.is_set():
            batch = []
            for _ in range(10):
                key = n % CERTIFICATES
                batch.append(OutboxMessage(kind="event", exchange=EVENTS_EXCHANGE,
                                           routing_key=f"certificate.{tag}.happened", message_id=f"{key}:{n}",
                                           body=b"{}", ordering_key=f"cert-{key}"))
                n += 1
            with engine.begin() as conn:
                SqlOutbox(conn).add(batch)
            written.extend(m.message_id for m in batch)
            for relay in relays.values():
                relay.wake()
            time.sleep(0.01)

    writing_thread = threading.Thread(target=writer, daemon=True)
    writing_thread.start()
    try:
        wait_for(lambda: lock_holder(engine) is not None, 10, "a leader")
        kills = []
        for _ in range(KILLS):
            time.sleep(GRACE_S + 1.0)  # the leader publishes for a second after its grace
            holder = lock_holder(engine)
            assert holder is not None
            with engine.begin() as conn:
                assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": holder[0]}).scalar_one()
            kills.append(holder[1])
            wait_for(lambda: lock_holder(engine) not in (None, holder), 10, "the next leader")
        writing.clear()
        writing_thread.join(5)
        with engine.connect() as conn:
            wait_for(lambda: pending_count(conn) == 0 or conn.rollback(), 60, "the outbox to be published")
        time.sleep(0.5)
    finally:
        writing.clear()
        for relay in relays.values():
            relay.stop(flush=False, timeout=5)
        for thread in threads:
            thread.join(10)
        for consumer in consumers:
            consumer.stopped.set()
            consumer.join(5)

    with record_lock:
        deliveries = sorted(record)
    terms = sum(relay.stats.terms for relay in relays.values())
    # leadership did move: both relays led, and every kill ended a term
    assert relays["A"].stats.terms >= 2 and relays["B"].stats.terms >= 2 and terms >= KILLS + 1
    assert set(kills) == {f"relay-A-{tag}", f"relay-B-{tag}"}

    # runs of one relay, in arrival order; never more runs than terms
    runs: list[list[tuple[float, str, str]]] = []
    for delivery in deliveries:
        if runs and runs[-1][-1][1] == delivery[1]:
            runs[-1].append(delivery)
        else:
            runs.append([delivery])
    assert 2 <= len(runs) <= terms
    run_of: dict[str, set[int]] = {}
    by_relay: dict[str, dict[str, int]] = {"A": {}, "B": {}}
    for index, run in enumerate(runs):
        for _, relay_name, message_id in run:
            run_of.setdefault(message_id, set()).add(index)
            by_relay[relay_name][message_id] = by_relay[relay_name].get(message_id, 0) + 1

    # nothing lost
    assert set(run_of) == set(written)
    # a message both relays published went out in two different runs, i.e. one after the other
    both = set(by_relay["A"]) & set(by_relay["B"])
    assert all(len(run_of[m]) >= 2 for m in both)
    # a certificate's events keep their order: the first delivery of each event comes after the first of every
    # earlier event of that certificate
    first_seen: dict[str, int] = {}
    for position, (_, _, message_id) in enumerate(deliveries):
        first_seen.setdefault(message_id, position)
    for key in range(CERTIFICATES):
        ids = [m for m in written if m.startswith(f"{key}:")]
        positions = [first_seen[m] for m in ids]
        assert positions == sorted(positions), f"certificate {key} out of order"
    same_relay_resends = sum(count - 1 for counts in by_relay.values() for count in counts.values() if count > 1)
    print(f"\n{len(written)} rows, {len(deliveries)} deliveries, {terms} terms, {len(runs)} runs, "
          f"{len(both)} re-sent by a successor, {same_relay_resends} re-sent by the same relay")
