"""Declares everything the service needs on the broker (CONTRACT §1), idempotently: at start-up, on every
reconnect, and from `intygstjanst topology`.

- `intyg.commands`: durable topic exchange, with `intyg.unrouted` as its alternate exchange, so a message of an
  unknown type reaches the service (and is answered) instead of being dropped by the broker;
- `intyg.unrouted`: durable fanout exchange, bound to the queue `intyg.unrouted`;
- `intyg.events`: durable topic exchange;
- every queue that holds messages is a durable quorum queue (a cluster keeps it when a node is lost):
  - the four service queues, bound to `intyg.commands` with their message types, and `intyg.unrouted`; each has a
    delivery limit after which the broker itself dead-letters to `Q.dlq` (a message that crashes the consumer
    on every delivery cannot loop: the broker's backstop behind the service's own retry policy);
  - `Q.dlq` per consumed queue;
  - `Q.retry.<ms>ms` per service queue and delay, with a message TTL, dead-lettering (at least once) to the
    default exchange with routing key `Q`, so that a retry copy returns to `Q` after the delay;
  - `recipient.R` per configured recipient, bound to `intyg.events` with `recipient.R.#`;
  - `intyg.access-log`, bound to `intyg.events` with `access.logged` only (CONTRACT §9).

A queue or exchange that already exists with other arguments (say, a classic `recipient.FKASSA` from an older
version) makes the broker close the channel with PRECONDITION_FAILED; `TopologyConflict` then names it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pika.exceptions import ChannelClosedByBroker

from consumers.retry import retry_queues
from contracts.topology import (
    ACCESS_LOG_QUEUE,
    ACCESS_LOGGED,
    COMMANDS_EXCHANGE,
    CONSUMED_QUEUES,
    EVENTS_EXCHANGE,
    SERVICE_QUEUES,
    UNROUTED,
    dlq,
    recipient_binding,
    recipient_queue,
)
from publishers import amqp

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
# Quorum queues dead-letter at most once unless told otherwise; at-least-once needs reject-publish overflow.
AT_LEAST_ONCE: dict[str, Any] = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
# Deliveries of one message (redeliveries after a crash or a requeue) before the broker dead-letters it. The
# service's own retries are new copies, so they do not count against it.
DELIVERY_LIMIT = 20
# The relay re-declares a missing recipient queue with these (they must equal the topology's declaration).
RECIPIENT_ARGUMENTS: dict[str, Any] = dict(QUORUM)
COMMANDS_ARGUMENTS: dict[str, Any] = {"alternate-exchange": UNROUTED}


class TopologyConflict(RuntimeError):
    """A queue or exchange exists with other settings than the service declares."""


@dataclass
class DeclaredExchange:
    name: str
    kind: str  # topic | fanout
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeclaredQueue:
    name: str
    kind: str  # quorum | classic
    role: str  # service | unrouted | dlq | retry | recipient | access-log
    bindings: list[str] = field(default_factory=list)  # "exchange: routing key"
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class Summary:
    exchanges: list[DeclaredExchange] = field(default_factory=list)
    queues: list[DeclaredQueue] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"exchanges": [{"name": e.name, "type": e.kind, "arguments": e.arguments} for e in self.exchanges],
                "queues": [{"name": q.name, "type": q.kind, "role": q.role, "bindings": q.bindings,
                            "arguments": q.arguments} for q in self.queues]}


def consumed_queue_arguments(queue: str) -> dict[str, Any]:
    return {**QUORUM, "x-delivery-limit": DELIVERY_LIMIT, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dlq(queue), **AT_LEAST_ONCE}


def planned(settings: Any) -> Summary:
    """What `declare` declares, without a broker."""
    summary = Summary(exchanges=list(EXCHANGES))
    for queue in CONSUMED_QUEUES:
        if queue == UNROUTED:
            summary.queues.append(DeclaredQueue(queue, "quorum", "unrouted", [f"{UNROUTED}: "],
                                                consumed_queue_arguments(queue)))
        else:
            summary.queues.append(DeclaredQueue(queue, "quorum", "service",
                                                [f"{COMMANDS_EXCHANGE}: {t}" for t in SERVICE_QUEUES[queue]],
                                                consumed_queue_arguments(queue)))
        summary.queues.append(DeclaredQueue(dlq(queue), "quorum", "dlq", [], dict(QUORUM)))
    for queue in SERVICE_QUEUES:
        for name, ttl_ms in retry_queues(queue, settings).items():
            summary.queues.append(DeclaredQueue(name, "quorum", "retry", [], {
                **QUORUM, "x-message-ttl": ttl_ms, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue,
                **AT_LEAST_ONCE}))
    # §9: for the national log service; bound to its one routing key only, never to a broadcast pattern.
    summary.queues.append(DeclaredQueue(ACCESS_LOG_QUEUE, "quorum", "access-log",
                                        [f"{EVENTS_EXCHANGE}: {ACCESS_LOGGED}"], dict(QUORUM)))
    for recipient in settings.recipients:
        rid = recipient.id
        summary.queues.append(DeclaredQueue(recipient_queue(rid), "quorum", "recipient",
                                            [f"{EVENTS_EXCHANGE}: {recipient_binding(rid)}"],
                                            dict(RECIPIENT_ARGUMENTS)))
    return summary


EXCHANGES = (DeclaredExchange(UNROUTED, "fanout"),  # first: the commands exchange names it
             DeclaredExchange(COMMANDS_EXCHANGE, "topic", dict(COMMANDS_ARGUMENTS)),
             DeclaredExchange(EVENTS_EXCHANGE, "topic"))


def declare_exchanges(channel: Any) -> None:
    """The three exchanges, as the service declares them (what a client that declares them must match)."""
    for exchange in EXCHANGES:
        _guard(f"exchange {exchange.name}",
               lambda: channel.exchange_declare(exchange.name, exchange_type=exchange.kind, durable=True,
                                                arguments=exchange.arguments or None))


def declare(channel: Any, settings: Any) -> Summary:
    """Declare (idempotently) every exchange, queue and binding on a pika BlockingChannel; returns a summary."""
    summary = planned(settings)
    declare_exchanges(channel)
    for queue in summary.queues:
        _guard(f"queue {queue.name}",
               lambda: channel.queue_declare(queue.name, durable=True, arguments=queue.arguments or None))
        for binding in queue.bindings:
            exchange, key = binding.split(": ", 1)
            channel.queue_bind(queue.name, exchange, routing_key=key)
    return summary


def declare_with(amqp_url: str, settings: Any) -> Summary:
    """Open a connection, declare, close."""
    connection = amqp.connect(amqp.Broker.from_settings(settings, amqp_url), "intygstjanst topology")
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
