"""publishers.relay against a real PostgreSQL and RabbitMQ: order, confirms, returns, leadership, flush, faults.

The module works in a database of its own (the relay publishes every unpublished row it finds), and observes
the broker through exclusive queues bound to routing keys unique to each test.
"""
from __future__ import annotations

import threading
import time
import uuid

import pika
import pytest
from sqlalchemy import select, text

from contracts.topology import EVENTS_EXCHANGE, recipient_binding, recipient_queue
from publishers.relay import UNROUTABLE_REPLY, OutboxRelay
from service.topology import declare_exchanges
from storage.outbox import (RELAY_LOCK, OutboxMessage, SqlOutbox, parked_rows, pending_count, release_lead,
                            try_lead, unpark)
from storage.tables import outbox

try:
    from tests.databases import empty_tables, migrated_engine
except ImportError:  # tests/ itself on sys.path
    from databases import empty_tables, migrated_engine

pytestmark = pytest.mark.integration


# --- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(database_url):
    with migrated_engine(database_url, "relay") as engine:
        yield engine


@pytest.fixture(autouse=True)
def _empty_outbox(engine):
    empty_tables(engine, "outbox")


@pytest.fixture
def channel(amqp_url):
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = connection.channel()
    declare_exchanges(ch)
    yield ch
    if connection.is_open:
        connection.close()


@pytest.fixture
def tag():
    """Unique per test: routing keys and message ids carry it, so nothing else shows up in what we observe."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def make_relay(amqp_url, engine):
    made: list[tuple[OutboxRelay, threading.Thread | None]] = []

    def make(start: bool = False, **kwargs) -> OutboxRelay:
        kwargs.setdefault("poll_s", 0.05)
        kwargs.setdefault("lead_poll_s", 0.2)
        kwargs.setdefault("backoff_initial_s", 0.1)
        kwargs.setdefault("backoff_max_s", 0.5)
        kwargs.setdefault("takeover_grace_s", 0.2)
        kwargs.setdefault("retry_base_s", 0.05)
        relay = OutboxRelay(amqp_url, engine, **kwargs)
        thread = None
        if start:
            thread = threading.Thread(target=relay.run, daemon=True)
            thread.start()
        made.append((relay, thread))
        return relay

    yield make
    for relay, thread in made:
        if thread is not None:
            relay.stop(flush=False, timeout=5)
            thread.join(10)
            assert not thread.is_alive()


# --- helpers ----------------------------------------------------------------------------------------------------
def observe(channel, *routing_keys: str, exchange: str = EVENTS_EXCHANGE) -> str:
    queue = channel.queue_declare("", exclusive=True).method.queue
    for key in routing_keys:
        channel.queue_bind(queue, exchange, routing_key=key)
    return queue


def reply_queue(channel) -> str:
    """A requester's reply queue (the relay publishes replies to the default exchange with its name)."""
    return channel.queue_declare("", exclusive=True).method.queue


def event(routing_key: str, message_id: str, **extra) -> OutboxMessage:
    return OutboxMessage(kind="event", exchange=EVENTS_EXCHANGE, routing_key=routing_key, message_id=message_id,
                         body=f'{{"event_id": "{message_id}", "type": "{routing_key}"}}'.encode(), **extra)


def reply(queue: str, message_id: str, correlation_id: str | None = None) -> OutboxMessage:
    return OutboxMessage(kind="reply", exchange="", routing_key=queue, message_id=message_id,
                         correlation_id=correlation_id, body=f'{{"request_id": "{message_id}"}}'.encode())


def write(engine, *messages: OutboxMessage, wake: list[OutboxRelay] = ()) -> None:
    with engine.begin() as conn:
        SqlOutbox(conn).add(list(messages))
    for relay in wake:
        relay.wake()


def drain(channel, queue: str, expected: int, timeout: float = 10.0) -> list[tuple[object, object, bytes]]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            channel.connection.sleep(0.02)
            continue
        got.append((method, properties, body))
    return got


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lock_holder(engine) -> int | None:
    """The backend that holds the relay lock in this database."""
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = :a AND objid = :b AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
            {"a": RELAY_LOCK[0], "b": RELAY_LOCK[1]}).scalar_one_or_none()


class ListLog:
    """A logger that keeps (message, fields) of every line."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def bind(self, **_fields) -> ListLog:
        return self

    def _keep(self, message: str, **fields) -> None:
        self.lines.append((message, fields))

    info = warning = error = _keep


def rows(engine) -> list:
    with engine.connect() as conn:
        return list(conn.execute(select(outbox).order_by(outbox.c.id)))


def pending(engine) -> int:
    with engine.connect() as conn:
        return pending_count(conn)


# --- tests ------------------------------------------------------------------------------------------------------
def test_publishes_in_order_with_properties_confirms_and_marks(engine, channel, make_relay, tag):
    events_q = observe(channel, f"certificate.{tag}.#")
    replies_q = reply_queue(channel)
    messages: list[OutboxMessage] = []
    for i in range(250):
        messages.append(event(f"certificate.{tag}.registered", f"{tag}-e{i}", headers={"x-test": i}))
        if i % 10 == 0:
            messages.append(reply(replies_q, f"{tag}-r{i}", correlation_id=f"corr-{i}"))
    write(engine, *messages)

    relay = make_relay(batch_size=64)  # several batches
    assert relay.run_once() == len(messages)

    got = drain(channel, events_q, 250)
    assert [p.message_id for _, p, _ in got] == [f"{tag}-e{i}" for i in range(250)]
    method, props, body = got[7]
    assert props.delivery_mode == 2
    assert props.content_type == "application/json"
    assert props.type == f"certificate.{tag}.registered"
    assert props.headers == {"x-test": 7}
    assert body == messages[[m.message_id for m in messages].index(f"{tag}-e7")].body
    assert method.routing_key == f"certificate.{tag}.registered"

    answers = drain(channel, replies_q, 25)
    assert [p.message_id for _, p, _ in answers] == [f"{tag}-r{i}" for i in range(0, 250, 10)]
    assert answers[1][1].correlation_id == "corr-10"
    assert answers[1][1].type is None and answers[1][1].delivery_mode == 2

    stored = rows(engine)
    assert all(r.published_at is not None for r in stored)
    assert all(r.last_error is None for r in stored)
    assert pending(engine) == 0
    assert relay.stats.published == len(messages)


def test_a_reply_nobody_can_receive_does_not_block_later_rows(engine, channel, make_relay, tag):
    events_q = observe(channel, f"certificate.{tag}.subscribed")
    replies_q = reply_queue(channel)
    write(engine,
          reply(f"gone-{tag}", f"{tag}-lost"),  # the requester's queue does not exist (any more)
          event(f"certificate.{tag}.unsubscribed", f"{tag}-nobody"),  # a broadcast nobody listens to
          event(f"certificate.{tag}.subscribed", f"{tag}-e1"),
          reply(replies_q, f"{tag}-r1"))

    relay = make_relay()
    assert relay.run_once() == 4

    assert [p.message_id for _, p, _ in drain(channel, events_q, 1)] == [f"{tag}-e1"]
    assert [p.message_id for _, p, _ in drain(channel, replies_q, 1)] == [f"{tag}-r1"]
    lost, nobody, e1, r1 = rows(engine)
    assert lost.published_at is not None and lost.last_error == UNROUTABLE_REPLY
    assert nobody.published_at is not None and nobody.last_error is None
    assert e1.published_at is not None and r1.published_at is not None
    assert relay.stats.unroutable_replies == 1 and relay.stats.unsubscribed_events == 1


def test_a_recipient_delivery_whose_queue_was_deleted_redeclares_it_and_is_delivered(engine, channel, make_relay,
                                                                                      tag):
    recipient = f"T{tag.upper()}"
    queue = recipient_queue(recipient)
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, EVENTS_EXCHANGE, routing_key=recipient_binding(recipient))
    channel.queue_delete(queue)  # an operator deleted it by mistake
    events_q = observe(channel, f"certificate.{tag}.#")
    try:
        write(engine,
              event(f"recipient.{recipient}.certificate.sent", f"{tag}-sent"),
              event(f"certificate.{tag}.sent", f"{tag}-broadcast"),
              event(f"recipient.{recipient}.certificate.revoked", f"{tag}-revoked"))

        relay = make_relay()
        assert relay.run_once() == 3

        delivered = drain(channel, queue, 2)
        assert [p.message_id for _, p, _ in delivered] == [f"{tag}-sent", f"{tag}-revoked"]  # in order
        assert delivered[0][1].type == f"recipient.{recipient}.certificate.sent"
        assert channel.queue_declare(queue, passive=True).method.message_count == 0
        assert relay.stats.recipient_queues_declared == 1
        assert pending(engine) == 0
        # each row is settled on its own: the broadcast beside the failed delivery went out once
        assert [p.message_id for _, p, _ in drain(channel, events_q, 2, timeout=1)] == [f"{tag}-broadcast"]
        sent = rows(engine)[0]
        assert sent.attempts == 1 and "missing" in sent.last_error
    finally:
        channel.queue_delete(queue)


def test_two_relays_on_one_database_only_one_publishes_and_the_other_takes_over(engine, channel, make_relay,
                                                                                 tag):
    events_q = observe(channel, f"certificate.{tag}.#")
    first = make_relay(start=True, batch_size=50)
    second = make_relay(start=True, batch_size=50)
    wait_for(lambda: first.stats.connected or second.stats.connected, what="a leader")
    time.sleep(0.5)  # the other one has asked for the lock by now, and been refused
    assert not (first.stats.leader and second.stats.leader)

    for batch in range(20):
        write(engine, *[event(f"certificate.{tag}.registered", f"{tag}-{batch}-{i}") for i in range(25)],
              wake=[first, second])
    got = drain(channel, events_q, 500)
    assert [p.message_id for _, p, _ in got] == [f"{tag}-{b}-{i}" for b in range(20) for i in range(25)]
    wait_for(lambda: pending(engine) == 0, what="everything marked published")
    leader, other = (first, second) if first.stats.published else (second, first)
    assert leader.stats.published == 500 and other.stats.published == 0
    time.sleep(0.3)
    assert drain(channel, events_q, 1, timeout=0.3) == []  # nothing published twice

    assert leader.stop(flush=True, timeout=5)  # the leader goes away: the other one takes over
    write(engine, *[event(f"certificate.{tag}.registered", f"{tag}-late-{i}") for i in range(10)], wake=[other])
    late = drain(channel, events_q, 10, timeout=10)
    assert [p.message_id for _, p, _ in late] == [f"{tag}-late-{i}" for i in range(10)]
    wait_for(lambda: other.stats.published == 10, what="the other relay's marks")


def test_a_nacked_row_is_sent_again_and_later_rows_never_overtake_it(engine, channel, make_relay, tag):
    # A queue that takes one message at a time and nacks the rest (reject-publish): the relay must try the nacked
    # row again, count the attempt, and publish the certificate's later rows only after it.
    full = channel.queue_declare("", exclusive=True,
                                 arguments={"x-max-length": 1, "x-overflow": "reject-publish"}).method.queue
    channel.queue_bind(full, EVENTS_EXCHANGE, routing_key=f"certificate.{tag}.#")
    channel.basic_publish("", full, b"{}", pika.BasicProperties(message_id=f"{tag}-blocker"))  # full now
    write(engine, *[event(f"certificate.{tag}.registered", f"{tag}-{i}", ordering_key="cert-1") for i in range(3)])
    relay = make_relay(start=True)
    wait_for(lambda: relay.stats.nacked >= 2, what="nacks while the queue is full")
    got = [p.message_id for _, p, _ in drain(channel, full, 1)]
    assert got == [f"{tag}-blocker"]
    got = []
    deadline = time.monotonic() + 20
    while len(got) < 3 and time.monotonic() < deadline:
        got += [p.message_id for _, p, _ in drain(channel, full, 1, timeout=0.5)]
    assert got == [f"{tag}-{i}" for i in range(3)]
    wait_for(lambda: pending(engine) == 0, what="marks")
    first = rows(engine)[0]
    assert first.attempts >= 2 and first.last_error == "nacked by the broker"


def test_a_certificates_events_keep_their_order_across_nacks_and_a_parked_row_holds_up_only_its_own(
        engine, channel, make_relay, tag):
    recipient = f"R{tag.upper()}"
    watch = observe(channel, f"recipient.{recipient}.#", f"certificate.{tag}.#")
    # The recipient's queue refuses everything (publisher nack); the delivery is still routed to `watch`, so each
    # attempt shows there.
    refuses = channel.queue_declare("", exclusive=True,
                                    arguments={"x-max-length": 0, "x-overflow": "reject-publish"}).method.queue
    channel.queue_bind(refuses, EVENTS_EXCHANGE, routing_key=f"recipient.{recipient}.#")
    write(engine,
          event(f"recipient.{recipient}.certificate.sent", f"{tag}-x-sent", ordering_key="X"),
          event(f"certificate.{tag}.revoked", f"{tag}-x-revoked", ordering_key="X"),
          event(f"certificate.{tag}.registered", f"{tag}-y-registered", ordering_key="Y"),
          event(f"certificate.{tag}.sent", f"{tag}-y-sent", ordering_key="Y"))
    relay = make_relay(start=True, max_attempts=3, retry_base_s=0.05)
    wait_for(lambda: relay.stats.parked == 1, what="the refused delivery to be parked")

    with engine.connect() as conn:
        parked = parked_rows(conn)
    assert [(r.message_id, r.attempts, r.last_error) for r in parked] == [(f"{tag}-x-sent", 3, "nacked by the broker")]
    time.sleep(0.3)  # rounds go on: Y is published, X's revoke waits behind its parked delivery
    seen = [p.message_id for _, p, _ in drain(channel, watch, 10, timeout=1)]
    assert [m for m in seen if "-y-" in m] == [f"{tag}-y-registered", f"{tag}-y-sent"]
    assert [m for m in seen if "-x-" in m] == [f"{tag}-x-sent"] * 3  # three refused attempts, no revoke
    assert pending(engine) == 2

    channel.queue_delete(refuses)  # the operator fixes the recipient's queue, then unparks
    with engine.begin() as conn:
        assert unpark(conn, None) == 1
    relay.wake()
    after = [p.message_id for _, p, _ in drain(channel, watch, 2, timeout=10)]
    assert after == [f"{tag}-x-sent", f"{tag}-x-revoked"]
    wait_for(lambda: pending(engine) == 0, what="marks")


def test_a_relay_whose_session_was_terminated_publishes_nothing_until_it_leads_again(engine, channel, make_relay,
                                                                                      tag):
    events_q = observe(channel, f"certificate.{tag}.#")
    relay = make_relay(start=True, backoff_initial_s=1.0, backoff_max_s=1.0)  # the rival asks first
    wait_for(lambda: relay.stats.connected, what="the relay")
    with engine.connect() as rival:
        holder = lock_holder(engine)
        assert holder == relay.stats.backend_pid
        # Terminate the leader's backend and take the lock before the relay can: it must notice, not publish.
        rival.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": holder})
        rival.commit()
        wait_for(lambda: try_lead(rival), what="the rival to take the lock")
        rival.commit()
        write(engine, *[event(f"certificate.{tag}.registered", f"{tag}-{i}") for i in range(5)], wake=[relay])
        time.sleep(1.0)
        assert drain(channel, events_q, 1, timeout=0.2) == []
        assert pending(engine) == 5 and not relay.stats.leader and relay.stats.interruptions >= 1
        terms = relay.stats.terms
        release_lead(rival)
        rival.commit()
        got = drain(channel, events_q, 5, timeout=10)
    assert [p.message_id for _, p, _ in got] == [f"{tag}-{i}" for i in range(5)]
    assert relay.stats.terms == terms + 1
    wait_for(lambda: pending(engine) == 0, what="marks")


def test_the_relays_database_session_carries_tcp_keepalives(engine, make_relay):
    log = ListLog()
    relay = make_relay(start=True, log=log, connection_name="relay-keepalive-test")
    wait_for(lambda: relay.stats.connected, what="the relay")
    (leads,) = [fields for message, fields in log.lines if message == "relay leads"]
    # read by the relay on its own session: the server-side settings in force there
    assert (leads["tcp_keepalives_idle"], leads["tcp_keepalives_interval"], leads["tcp_keepalives_count"]) == (
        "10", "5", "3")
    assert leads["backend_pid"] == lock_holder(engine)
    with engine.connect() as conn:
        name = conn.execute(text("SELECT application_name FROM pg_stat_activity WHERE pid = :pid"),
                            {"pid": leads["backend_pid"]}).scalar_one()
    assert name == "relay-keepalive-test"


def test_wake_publishes_at_once_without_waiting_for_the_poll(engine, channel, make_relay, tag):
    replies_q = reply_queue(channel)
    relay = make_relay(start=True, poll_s=30)
    wait_for(lambda: relay.stats.connected, what="the relay")
    started = time.monotonic()
    write(engine, reply(replies_q, f"{tag}-r"), wake=[relay])
    assert [p.message_id for _, p, _ in drain(channel, replies_q, 1, timeout=5)] == [f"{tag}-r"]
    assert time.monotonic() - started < 2


def test_stop_with_flush_publishes_what_is_pending(engine, channel, make_relay, tag):
    events_q = observe(channel, f"certificate.{tag}.#")
    relay = make_relay(start=True, poll_s=60)  # it will not poll again during this test
    wait_for(lambda: relay.stats.connected, what="the relay")
    time.sleep(0.2)
    write(engine, *[event(f"certificate.{tag}.registered", f"{tag}-{i}") for i in range(30)])  # no wake
    time.sleep(0.3)
    assert pending(engine) == 30
    started = time.monotonic()
    assert relay.stop(flush=True, timeout=10)
    assert time.monotonic() - started < 3  # it returns once flushed, not at the timeout
    assert not relay.running
    assert pending(engine) == 0
    assert [p.message_id for _, p, _ in drain(channel, events_q, 30)] == [f"{tag}-{i}" for i in range(30)]


def test_losing_the_database_session_ends_the_term_and_the_relay_comes_back(engine, channel, make_relay, tag):
    events_q = observe(channel, f"certificate.{tag}.#")
    relay = make_relay(start=True)
    wait_for(lambda: relay.stats.connected, what="the relay")
    with engine.begin() as conn:  # kill the leader's session (and with it the lock)
        killed = conn.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND classid = :a "
            "AND objid = :b AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"), {"a": RELAY_LOCK[0], "b": RELAY_LOCK[1]}).scalars().all()
    assert killed == [True]
    write(engine, *[event(f"certificate.{tag}.registered", f"{tag}-{i}") for i in range(5)], wake=[relay])
    got = drain(channel, events_q, 5, timeout=15)
    assert [p.message_id for _, p, _ in got] == [f"{tag}-{i}" for i in range(5)]
    wait_for(lambda: pending(engine) == 0, what="marks")
    assert relay.stats.interruptions >= 1


def test_losing_the_broker_connection_unconfirmed_rows_are_sent_again(engine, channel, make_relay, tag, amqp_url):
    ctl = _rabbitmqctl()
    events_q = observe(channel, f"certificate.{tag}.#")
    name = f"relay-test-{tag}"
    relay = make_relay(start=True, connection_name=name)
    wait_for(lambda: relay.stats.connected, what="the relay")
    vhost = pika.URLParameters(amqp_url).virtual_host
    listing = ctl("list_connections", "-p", vhost, "pid", "client_properties", "--no-table-headers", "--silent")
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if name in line]
    assert len(pids) == 1
    ctl("close_connection", pids[0], "test: broker connection lost")
    wait_for(lambda: relay.stats.interruptions >= 1, what="the relay to notice")
    write(engine, *[event(f"certificate.{tag}.registered", f"{tag}-{i}") for i in range(5)], wake=[relay])
    got = drain(channel, events_q, 5, timeout=15)
    assert [p.message_id for _, p, _ in got] == [f"{tag}-{i}" for i in range(5)]
    wait_for(lambda: pending(engine) == 0, what="marks")


def _rabbitmqctl():
    import shutil
    import subprocess

    exe = shutil.which("rabbitmqctl")
    if exe is None:
        pytest.skip("rabbitmqctl is not available")

    def run(*args: str) -> str:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            pytest.skip(f"rabbitmqctl failed: {done.stderr.strip()[:200]}")
        return done.stdout
    return run
