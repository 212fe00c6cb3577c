"""Faults end to end (CONTRACT §8): a crash between commit and ack, the broker and the database going away and coming
back (through `tests/proxy.py`), and SIGTERM while messages are in flight."""
from __future__ import annotations

import json
import signal
import time
import uuid
from urllib.parse import urlsplit

import pytest

try:
    from tests.e2e.common import BY, CG, certificate, check_dead_letter, check_event, check_reply, revoke_body
    from tests.e2e.harness import Msg, dlq_cli, new_id, new_patient
    from tests.proxy import TcpProxy
except ImportError:  # tests/ itself on sys.path
    from e2e.common import BY, CG, certificate, check_dead_letter, check_event, check_reply, revoke_body
    from e2e.harness import Msg, dlq_cli, new_id, new_patient
    from proxy import TcpProxy

pytestmark = pytest.mark.integration


def _upstream(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (5672 if parts.scheme.startswith("amqp") else 5432)


def _distinct_events(wire, routing_key: str, certificate_id: str) -> set[str]:
    return {e.body["event_id"] for e in wire.events_where(routing_key, certificate_id=certificate_id)}


def test_a_crash_between_commit_and_ack_stores_once_and_still_replies_and_publishes(launch, wire, stack):
    message_id = f"crash-{uuid.uuid4()}"
    cid, p = new_id(), new_patient()
    crashing = launch(TEST_CRASH_AFTER_COMMIT=message_id)
    wire.send("certificate.register", {"certificate": certificate(cid, p)}, message_id=message_id)
    assert crashing.wait(30) == -signal.SIGKILL
    assert "crash injected after commit" in crashing.log_text()
    # the transaction was committed before the crash, the delivery never acknowledged
    assert stack.db.scalar("select count(*) from certificates where id = %s", cid) == 1
    assert stack.db.scalar("select count(*) from inbox where message_id = %s", message_id) == 1

    launch()  # normally: the broker redelivers, the inbox answers it, the relay publishes the outbox
    first = check_reply(wire, message_id, "OK")
    wire.wait_events("certificate.registered", certificate_id=cid)
    wire.pump(1.5)  # a second reply or event would arrive now
    replies = wire.replies[message_id]
    print(f"crash: {len(replies)} replies, {len(wire.events_where('certificate.registered', certificate_id=cid))} "
          f"registered events")
    assert 1 <= len(replies) <= 2 and all(r.body == first for r in replies), [r.body for r in replies]
    assert len(_distinct_events(wire, "certificate.registered", cid)) == 1
    assert stack.db.scalar("select count(*) from certificates where id = %s", cid) == 1
    assert wire.ready("intyg.registration") == 0 and wire.ready("intyg.registration.dlq") == 0
    # and it goes on working
    check_reply(wire, wire.send("certificate.register", {"certificate": certificate(new_id(), p)}), "OK")


@pytest.mark.parametrize("routing_key", ["certificate.get-for-care", "certificate.revoke"])
def test_a_crash_between_commit_and_ack_logs_the_access_once(launch, wire, stack, routing_key):
    """§9: the entry is committed with the answer; the redelivery (a query: answered again, not from the inbox; a
    command: from the inbox) neither logs nor publishes it again."""
    message_id = f"crash-{uuid.uuid4()}"
    cid, p = new_id(), new_patient()
    crashing = launch(TEST_CRASH_AFTER_COMMIT=message_id)
    check_reply(wire, wire.send("certificate.register", {"certificate": certificate(cid, p)}), "OK")
    body = {"certificate_id": cid, "care_giver_id": CG, **BY} if routing_key == "certificate.get-for-care" \
        else revoke_body(cid, p)
    wire.send(routing_key, body, message_id=message_id)
    assert crashing.wait(30) == -signal.SIGKILL
    entries = "select count(*) from access_log where message_id = %s"
    assert stack.db.scalar(entries, message_id) == 1  # committed before the crash, never acknowledged

    launch()
    check_reply(wire, message_id, "OK")
    wire.pump(1.5)  # a second entry would be published now
    assert stack.db.scalar(entries, message_id) == 1
    [published] = [check_event(m) for m in wire.take("intyg.access-log", count=1)]
    assert wire.take("intyg.access-log", settle=0.5) == []
    assert (published["certificate_id"], published["patient_id"]) == (cid, p)
    queue = "intyg.query" if routing_key == "certificate.get-for-care" else "intyg.status"
    assert wire.ready(queue) == 0 and wire.ready(f"{queue}.dlq") == 0


def test_the_broker_going_away_and_back_loses_nothing_and_applies_each_message_once(launch, wire, stack):
    proxy = TcpProxy(_upstream(stack.amqp_url)).start()
    try:
        service = launch(AMQP_URL=stack.url_via("127.0.0.1", proxy.port))
        p = new_patient()
        check_reply(wire, wire.send("certificate.register", {"certificate": certificate(new_id(), p)}), "OK")

        sent: dict[str, str] = {}  # message_id -> certificate id
        outage = None
        for i in range(36):  # ~5 s of traffic straight to the broker; the proxy is down from ~1 s to ~4 s
            if i == 6:
                proxy.stop()
                outage = time.monotonic()
            if i == 27:
                wire.pump(max(0.0, 3.0 - (time.monotonic() - outage)))  # down for at least 3 s
                proxy.start()
            cid = new_id()
            sent[wire.send("certificate.register", {"certificate": certificate(cid, p)})] = cid
            wire.pump(0.12)

        wire.pump_until(lambda: all(wire.replies.get(m) for m in sent), 30, "a reply to every message")
        wire.pump_until(lambda: all(wire.events_where("certificate.registered", certificate_id=c)
                                    for c in sent.values()), 15, "every registered event")
        wire.pump(1.0)
        print(f"broker outage: {sum(len(wire.replies[m]) for m in sent)} replies to {len(sent)} messages, "
              f"{len(wire.events_where('certificate.registered'))} registered events")
        for message_id in sent:
            replies = wire.replies[message_id]
            check_reply(wire, message_id, "OK")
            assert all(r.body == replies[0].body for r in replies)  # a re-published reply is the same reply
        for cid in sent.values():
            assert len(_distinct_events(wire, "certificate.registered", cid)) == 1, cid
        assert stack.db.scalar("select count(*) from certificates where id = any(%s)", list(sent.values())) == 36
        assert stack.db.scalar("select count(*) from inbox where message_id = any(%s)", list(sent)) == 36
        assert "reconnecting" in service.log_text()
        assert proxy.connections_total > 6  # the service did connect again
        assert service.terminate() == 0  # while the proxy is still there
    finally:
        proxy.stop()


def test_the_database_going_away_means_retries_then_unavailable_and_dlq_replay_applies_once(launch, wire, stack):
    proxy = TcpProxy(_upstream(stack.database_url)).start()
    try:
        launch(DATABASE_URL=stack.url_via("127.0.0.1", proxy.port, database=True), RETRY_DELAYS_S=[0.5, 1.0, 1.5])
        p = new_patient()
        check_reply(wire, wire.send("certificate.register", {"certificate": certificate(new_id(), p)}), "OK")

        # a short outage, shorter than the retries: retried, then applied; one reply
        proxy.stop()
        short_cid = new_id()
        short = wire.send("certificate.register", {"certificate": certificate(short_cid, p)})
        service = launch.processes[0]
        service.wait_log(short, timeout=30)  # its first attempt failed and was logged (retry)
        wire.pump(0.3)
        proxy.start()
        check_reply(wire, short, "OK", timeout=15)
        retried = [line for line in service.log_lines() if line.get("message_id") == short]
        assert any(line.get("outcome") == "RETRY" for line in retried), retried
        assert len(wire.replies[short]) == 1

        # a long outage, longer than the retries: UNAVAILABLE and dead letters
        proxy.stop()
        long_cids = [new_id() for _ in range(3)]
        long_ids = [wire.send("certificate.register", {"certificate": certificate(c, p)}) for c in long_cids]
        consent = wire.send("consent.set", {"patient_id": p, "given": True})
        for message_id in [*long_ids, consent]:
            check_reply(wire, message_id, "ERROR", "UNAVAILABLE", timeout=20)
        wire.pump_until(lambda: wire.ready("intyg.registration.dlq") == 3 and wire.ready("intyg.consent.dlq") == 1,
                        10, "the dead letters")
        shown = dlq_cli(stack.amqp_url, "show", "intyg.registration", "--json")
        assert shown.returncode == 0, shown.stderr
        letters = json.loads(shown.stdout)
        assert sorted(letter["message_id"] for letter in letters) == sorted(long_ids)
        for letter in letters:
            headers = letter["headers"]
            assert letter["error_code"] == "UNAVAILABLE" and letter["error"] == "database unavailable"
            check_dead_letter(Msg("", _Props(headers), b""), code="UNAVAILABLE", routing_key="certificate.register",
                              error_contains="database unavailable", attempts=4)  # 1 + len(RETRY_DELAYS_S)
        assert stack.db.scalar("select count(*) from certificates where id = any(%s)", long_cids) == 0

        # the database is back: replay them; each applies once and is answered again, now OK
        proxy.start()
        check_reply(wire, wire.send("consent.get", {"patient_id": p}), "OK", timeout=20)  # the service reads again
        replayed = dlq_cli(stack.amqp_url, "replay", "intyg.registration", "--all")
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert "replayed 3 of 3" in replayed.stdout
        replayed = dlq_cli(stack.amqp_url, "replay", "intyg.consent", "--id", consent)
        assert replayed.returncode == 0 and "replayed 1 of 1" in replayed.stdout
        for message_id in [*long_ids, consent]:
            wire.pump_until(lambda: len(wire.replies[message_id]) >= 2, 15, "the reply to the replay")
            assert wire.replies[message_id][1].body["result"] == "OK", wire.replies[message_id][1].body
        again = wire.send("certificate.register", {"certificate": certificate(long_cids[0], p)},
                          message_id=long_ids[0])  # the same message once more: the same answer, no effect
        wire.pump_until(lambda: len(wire.replies[again]) >= 3, 15, "the answer to a resend")
        assert wire.replies[again][2].body == wire.replies[again][1].body
        wire.pump(1.0)
        assert stack.db.scalar("select count(*) from certificates where id = any(%s)", long_cids) == 3
        for cid in long_cids:
            assert len(wire.events_where("certificate.registered", certificate_id=cid)) == 1
        assert wire.ready("intyg.registration.dlq") == 0 and wire.ready("intyg.consent.dlq") == 0
        assert service.terminate() == 0
    finally:
        proxy.stop()


class _Props:
    """Headers from `dlq show --json` in the shape `check_dead_letter` reads."""

    def __init__(self, headers: dict) -> None:
        self.headers = headers


def test_sigterm_while_messages_are_in_flight_finishes_what_it_acknowledged_and_exits_0(launch, wire, stack):
    service = launch(BATCH_SIZE=5, PREFETCH=20)
    p = new_patient()
    n = 400
    sent = {}
    for _ in range(n):
        cid = new_id()
        sent[wire.send("certificate.register", {"certificate": certificate(cid, p)})] = cid
    wire.pump_until(lambda: len(wire.replies) >= 10, 20, "the first replies")
    service.proc.send_signal(signal.SIGTERM)
    assert service.wait(40) == 0
    assert "signal received; stopping" in service.log_text() and "service stopped" in service.log_text()

    handled = {row[0] for row in stack.db.rows("select message_id from inbox where message_id = any(%s)",
                                               list(sent))}
    # a quorum queue counts the returned (unacknowledged) deliveries again a moment after the connection closed
    wire.pump_until(lambda: len(handled) + wire.ready("intyg.registration") >= n, 10, "the rest back in the queue")
    wire.pump(0.5)
    left = wire.ready("intyg.registration")
    print(f"sigterm: {len(handled)} handled, {left} left in the queue")
    assert 0 < len(handled) and len(handled) + left == n  # every acknowledged message was handled, nothing lost
    assert set(wire.replies) & set(sent) == handled  # and the reply of each was published before the exit
    assert {e.body["certificate_id"] for e in wire.events_where("certificate.registered")} == \
        {sent[m] for m in handled}

    launch()  # the rest is handled by the next process, each once
    wire.pump_until(lambda: all(wire.replies.get(m) for m in sent), 60, "a reply to every message")
    wire.pump(1.0)
    for message_id, replies in wire.replies.items():
        assert all(r.body == replies[0].body and r.body["result"] == "OK" for r in replies), message_id
    assert stack.db.scalar("select count(*) from certificates where id = any(%s)", list(sent.values())) == n
    events = wire.events_where("certificate.registered")
    assert {e.body["certificate_id"] for e in events} == set(sent.values())
    assert len({e.body["event_id"] for e in events}) == n


def test_sigterm_while_the_database_is_down_exits_0_without_spinning(launch, wire, stack):
    proxy = TcpProxy(_upstream(stack.database_url)).start()
    try:
        service = launch(DATABASE_URL=stack.url_via("127.0.0.1", proxy.port, database=True))
        check_reply(wire, wire.send("certificate.register", {"certificate": certificate(new_id(), new_patient())}),
                    "OK")
        proxy.stop()
        wire.pump(0.5)
        assert service.terminate(40) == 0
        log = service.log_text()
        after = log[log.index("signal received"):]
        assert after.count("relay interrupted") <= 20, f"{after.count('relay interrupted')} reconnect warnings"
    finally:
        proxy.stop()
