"""Load under a fault, for the failover tests: registrations, then sends to FKASSA, with a fault injected while
they are in flight, and the checks that nothing was lost or done twice."""
from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pika

from contracts.topology import COMMANDS_EXCHANGE

try:
    from tests.e2e.common import BY, CG, certificate
    from tests.e2e.harness import new_patient
except ImportError:  # tests/ itself on sys.path
    from e2e.common import BY, CG, certificate
    from e2e.harness import new_patient


class Driver:
    """Every client on one connection to one node: publishes with confirms, collects replies on an exclusive
    queue of its own (all replies kept, so duplicates show)."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.reply_queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.replies: dict[str, list[tuple[str | None, dict[str, Any]]]] = defaultdict(list)
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)

    def _on_reply(self, _ch: Any, _method: Any, properties: Any, body: bytes) -> None:
        self.replies[properties.correlation_id].append((properties.message_id, json.loads(body)))

    def send(self, routing_key: str, body: dict[str, Any]) -> str:
        message_id = f"load-{uuid.uuid4()}"
        self.channel.basic_publish(COMMANDS_EXCHANGE, routing_key, json.dumps(body).encode(), pika.BasicProperties(
            content_type="application/json", delivery_mode=2, message_id=message_id, reply_to=self.reply_queue),
            mandatory=True)
        return message_id

    def answered(self, message_ids: list[str]) -> int:
        return sum(1 for m in message_ids if self.replies.get(m))

    def pump_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} within {timeout:.0f}s")
            self.connection.process_data_events(time_limit=0.1)

    def take_all(self, queue: str, settle_s: float = 3.0) -> list[tuple[Any, dict[str, Any]]]:
        out = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < settle_s:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                self.connection.process_data_events(time_limit=0.1)
                continue
            out.append((properties, json.loads(body)))
            quiet_since = time.monotonic()
        return out

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def under_fault(driver: Driver, messages: list[tuple[str, dict[str, Any]]], fault: Callable[[], None], *,
                timeout: float = 240.0) -> list[str]:
    """Publish the first half, inject `fault` once a fifth is answered, publish the rest, wait for every reply."""
    half = len(messages) // 2
    ids = [driver.send(key, body) for key, body in messages[:half]]
    driver.pump_until(lambda: driver.answered(ids) >= len(messages) // 5, timeout, "a fifth answered")
    fault()
    ids += [driver.send(key, body) for key, body in messages[half:]]
    driver.pump_until(lambda: driver.answered(ids) == len(ids), timeout,
                      f"every message answered (so far {driver.answered(ids)} of {len(ids)})")
    driver.connection.process_data_events(time_limit=2.0)  # a late duplicate would arrive now
    return ids


def registrations(count: int) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for _ in range(count):
        cid, patient = f"c-{uuid.uuid4()}", new_patient()
        out.append(("certificate.register", {"certificate": certificate(cid, patient)}))
    return out


def sends_to_fkassa(registered: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [("certificate.send", {"certificate_id": body["certificate"]["id"],
                                  "patient_id": body["certificate"]["patient_id"], "recipient_id": "FKASSA",
                                  "sent_by": "CARE", "care_giver_id": CG, **BY}) for _, body in registered]


def check_answered_once(driver: Driver, ids: list[str], results: set[str]) -> int:
    """Every request has replies, all of them one and the same reply (same message_id and body: a redelivered
    request is answered again with the stored reply, which a client recognises by its message_id), and the
    expected result. Returns how many identical repeats arrived."""
    repeats = 0
    for message_id in ids:
        replies = driver.replies[message_id]
        assert replies, f"no reply to {message_id}"
        assert all(r == replies[0] for r in replies), f"different replies to {message_id}: {replies}"
        assert replies[0][1]["result"] in results, replies[0]
        repeats += len(replies) - 1
    return repeats


def check_delivered_once(deliveries: list[tuple[Any, dict[str, Any]]], sends: list[tuple[str, dict[str, Any]]]) -> int:
    """Each sent certificate reached the recipient under exactly one event id; returns the identical repeats."""
    event_ids: dict[str, set[str]] = defaultdict(set)
    for _properties, body in deliveries:
        event_ids[body["certificate"]["id"]].add(body["event_id"])
    wanted = {body["certificate_id"] for _, body in sends}
    assert set(event_ids) == wanted, (f"{len(wanted - set(event_ids))} sends never delivered, "
                                      f"{len(set(event_ids) - wanted)} unexpected")
    twice = {cid: ids for cid, ids in event_ids.items() if len(ids) != 1}
    assert not twice, f"{len(twice)} certificates delivered under several event ids: {list(twice.items())[:3]}"
    return len(deliveries) - len(wanted)
