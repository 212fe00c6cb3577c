"""Declares everything the service needs on the broker (CONTRACT §1), idempotently: at start-up, on every
reconnect, and from `intygstjanst topology`.

- `intyg.commands`, `intyg.events`: durable topic exchanges.
- the four service queues: durable quorum queues, bound to `intyg.commands` with their message types;
- `Q.dlq`: durable quorum queue per service queue;
- `Q.retry.<ms>ms`: durable classic queue per service queue and delay, with a message TTL, dead-lettering to the
  default exchange with routing key `Q`, so that a retry copy returns to `Q` after the delay;
- `recipient.R`: durable (classic) queue per configured recipient, bound to `intyg.events` with `recipient.R.#`.

A queue that already exists with other arguments (say, a classic `intyg.status` from an older version) makes the
broker close the channel with PRECONDITION_FAILED; `TopologyConflict` then names the queue.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pika
from pika.exceptions import ChannelClosedByBroker

from consumers.retry import retry_queues
from contracts.topology import (
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    SERVICE_QUEUES,
    dlq,
    recipient_binding,
    recipient_queue,
)

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
# Recipient queues are plain durable (classic) queues; the outbox relay re-declares a missing one with these.
RECIPIENT_ARGUMENTS: dict[str, Any] | None = None


class TopologyConflict(RuntimeError):
    """A queue or exchange exists with other settings than the service declares."""


@dataclass
class DeclaredQueue:
    name: str
    kind: str  # quorum | classic
    role: str  # service | dlq | retry | recipient
    bindings: list[str] = field(default_factory=list)  # "exchange: routing key"
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class Summary:
    exchanges: list[tuple[str, str]] = field(default_factory=list)  # (name, type)
    queues: list[DeclaredQueue] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"exchanges": [{"name": n, "type": t} for n, t in self.exchanges],
                "queues": [{"name": q.name, "type": q.kind, "role": q.role, "bindings": q.bindings,
                            "arguments": q.arguments} for q in self.queues]}


def planned(settings: Any) -> Summary:
    """What `declare` declares, without a broker."""
    summary = Summary(exchanges=[(COMMANDS_EXCHANGE, "topic"), (EVENTS_EXCHANGE, "topic")])
    for queue, types in SERVICE_QUEUES.items():
        summary.queues.append(DeclaredQueue(queue, "quorum", "service",
                                            [f"{COMMANDS_EXCHANGE}: {t}" for t in types], dict(QUORUM)))
        summary.queues.append(DeclaredQueue(dlq(queue), "quorum", "dlq", [], dict(QUORUM)))
        for name, ttl_ms in retry_queues(queue, settings).items():
            summary.queues.append(DeclaredQueue(name, "classic", "retry", [], {
                "x-message-ttl": ttl_ms, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}))
    for recipient in settings.recipients:
        rid = recipient.id
        summary.queues.append(DeclaredQueue(recipient_queue(rid), "classic", "recipient",
                                            [f"{EVENTS_EXCHANGE}: {recipient_binding(rid)}"],
                                            dict(RECIPIENT_ARGUMENTS or {})))
    return summary


def declare(channel: Any, settings: Any) -> Summary:
    """Declare (idempotently) every exchange, queue and binding on a pika BlockingChannel; returns a summary."""
    summary = planned(settings)
    for name, kind in summary.exchanges:
        _guard(f"exchange {name}", lambda: channel.exchange_declare(name, exchange_type=kind, durable=True))
    for queue in summary.queues:
        _guard(f"queue {queue.name}",
               lambda: channel.queue_declare(queue.name, durable=True, arguments=queue.arguments or None))
        for binding in queue.bindings:
            exchange, key = binding.split(": ", 1)
            channel.queue_bind(queue.name, exchange, routing_key=key)
    return summary


def declare_with(amqp_url: str, settings: Any) -> Summary:
    """Open a connection, declare, close."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return declare(connection.channel(), settings)
    finally:
        if connection.is_open:
            connection.close()


def _guard(what: str, call: Any) -> None:
    try:
        call()
    except ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise TopologyConflict(f"{what} exists with other settings ({exc.reply_text}); delete it or migrate it "
                                   f"by hand, the service will not change an existing queue") from exc
        raise
