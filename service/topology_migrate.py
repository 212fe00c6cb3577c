"""`intygstjanst topology --migrate`: bring an older installation's topology to what `service.topology` declares,
without losing a message.

The broker never changes a queue's type or arguments: a queue declared differently (a classic `recipient.R` or
delay queue of an older version, a service queue without the delivery limit) must be deleted and declared anew.
For each such queue `Q`:

1. declare `Q.migrating` (a quorum queue without TTL) with `Q`'s bindings and unbind `Q`, so that what is
   published meanwhile lands there;
2. move every message `Q` -> `Q.migrating`, each acknowledged on `Q` only once its copy is confirmed;
3. delete `Q` once it is empty (anything that arrived during step 2 is moved first);
4. declare `Q` with the service's arguments and bindings;
5. move `Q.migrating` -> `Q` the same way and delete `Q.migrating`.

An exchange declared differently (`intyg.commands` without its alternate exchange) is deleted and declared anew;
the final `declare` binds every queue to it again. A migration cut short (Ctrl-C, a lost connection) is resumed by
running it again: a `Q.migrating` that still exists is emptied into `Q` first.

A moved message keeps its body, properties and headers, but for one thing: the broker lets a publisher set only its
own `user_id`, so a client's command taken out of a service queue goes back as the service's own retry copies do,
published by the service's user with its sender and routing key in the signed `x-intyg-*` bookkeeping (one attempt
counted). Run it with the service's settings (its `AMQP_URL` user and signing key), with the consumers stopped.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.exceptions import ChannelClosedByBroker

from consumers import retry
from consumers.envelope import kept_client_headers
from publishers import amqp
from service import topology

TEMPORARY_SUFFIX = ".migrating"
MAX_ROUNDS = 10  # attempts to catch up with a queue that is still being published to


@dataclass
class Migration:
    exchanges: list[str] = field(default_factory=list)  # declared anew
    queues: dict[str, int] = field(default_factory=dict)  # declared anew -> messages moved back into it
    resumed: dict[str, int] = field(default_factory=dict)  # leftovers of an earlier run -> messages moved


class Migrator:
    def __init__(self, connection: Any, settings: Any) -> None:
        self.connection = connection
        self.settings = settings
        self.user = amqp.Broker.from_settings(settings).user
        self.signer = retry.Signer(settings.signing_key)
        self.channel = self._fresh_channel()

    def _fresh_channel(self) -> Any:
        channel = self.connection.channel()
        channel.confirm_delivery()  # every move waits for the broker's confirm (a nack raises)
        return channel

    def run(self) -> Migration:
        result = Migration()
        plan = topology.planned(self.settings)
        for exchange in plan.exchanges:
            declare = lambda ch, e=exchange: ch.exchange_declare(  # noqa: E731
                e.name, exchange_type=e.kind, durable=True, arguments=e.arguments or None)
            if not self._accepts(declare):
                self.channel.exchange_delete(exchange.name)
                declare(self.channel)
                result.exchanges.append(exchange.name)
        # Delay queues first: rebuilt, they dead-letter at least once, so a retry copy that expires while its
        # service queue is being rebuilt waits for it instead of being dropped.
        for queue in sorted(plan.queues, key=lambda q: q.role != "retry"):
            if not self._accepts(lambda ch, q=queue: ch.queue_declare(q.name, durable=True,
                                                                      arguments=q.arguments or None)):
                result.queues[queue.name] = self._rebuild(queue)
            moved = self._resume(queue)
            if moved is not None:
                result.resumed[queue.name] = moved
        topology.declare(self.channel, self.settings)
        return result

    def _accepts(self, declare: Any) -> bool:
        """Declare as the service does: False if the broker has it with other settings (406 closes the channel)."""
        try:
            declare(self.channel)
            return True
        except ChannelClosedByBroker as exc:
            self.channel = self._fresh_channel()
            if exc.reply_code == 406:
                return False
            raise

    def _rebuild(self, queue: topology.DeclaredQueue) -> int:
        temporary = queue.name + TEMPORARY_SUFFIX
        self.channel.queue_declare(temporary, durable=True, arguments=dict(topology.QUORUM))
        for exchange, key in _bindings(queue):  # from now on what is published lands in the temporary queue
            self.channel.queue_bind(temporary, exchange, routing_key=key)
            self.channel.queue_unbind(queue.name, exchange, routing_key=key)
        self._empty_into(queue.name, temporary, consumed=queue.role in ("service", "unrouted"))
        # A channel that used the old queue keeps its queue-type state, and RabbitMQ 3.10 fails the connection
        # (INTERNAL_ERROR) when that channel publishes to a new queue of another type under the same name.
        self.channel.close()
        self.channel = self._fresh_channel()
        self.channel.queue_declare(queue.name, durable=True, arguments=queue.arguments or None)
        for exchange, key in _bindings(queue):
            self.channel.queue_bind(queue.name, exchange, routing_key=key)
            self.channel.queue_unbind(temporary, exchange, routing_key=key)
        return self._empty_into(temporary, queue.name)

    def _resume(self, queue: topology.DeclaredQueue) -> int | None:
        temporary = queue.name + TEMPORARY_SUFFIX
        try:
            self.channel.queue_declare(temporary, passive=True)
        except ChannelClosedByBroker as exc:
            self.channel = self._fresh_channel()
            if exc.reply_code == 404:
                return None
            raise
        return self._empty_into(temporary, queue.name)

    def _empty_into(self, source: str, target: str, *, consumed: bool = False) -> int:
        """Move everything from `source` to `target`, then delete `source` once it is empty. `consumed`: `source`
        is a queue the service consumes (its messages are commands of clients)."""
        moved = 0
        for _ in range(MAX_ROUNDS):
            moved += self._move(source, target, consumed)
            # (a quorum queue cannot be deleted `if_empty`: RabbitMQ closes the connection instead)
            if self.channel.queue_declare(source, passive=True).method.message_count == 0:
                self.channel.queue_delete(source)
                return moved
        raise RuntimeError(f"{source} keeps receiving messages; stop what publishes to it and run again")

    def _move(self, source: str, target: str, consumed: bool) -> int:
        moved = 0
        while True:
            method, properties, body = self.channel.basic_get(source, auto_ack=False)
            if method is None:
                return moved
            copy = self._copy(method, properties) if consumed else properties
            self.channel.basic_publish("", target, body, copy, mandatory=True)  # returns once confirmed
            self.channel.basic_ack(method.delivery_tag)
            moved += 1

    def _copy(self, method: Any, properties: pika.BasicProperties) -> pika.BasicProperties:
        """A client's command as a retry copy of ours (see the module doc); one of ours (already signed) as it is."""
        headers = dict(properties.headers or {})
        if self.signer.verified(headers, properties.message_id) is not None:
            return properties
        signed = retry.retry_headers(kept_client_headers(headers), properties.message_id,
                                     retry.History.fresh(dt.datetime.now(dt.UTC)), method.routing_key,
                                     user_id=properties.user_id, code="MIGRATED",
                                     error="moved by intygstjanst topology --migrate", signer=self.signer)
        return pika.BasicProperties(content_type=properties.content_type, headers=signed, delivery_mode=2,
                                    correlation_id=properties.correlation_id, reply_to=properties.reply_to,
                                    message_id=properties.message_id, type=properties.type, user_id=self.user)


def _bindings(queue: topology.DeclaredQueue) -> list[tuple[str, str]]:
    return [tuple(binding.split(": ", 1)) for binding in queue.bindings]  # type: ignore[misc]


def migrate_with(settings: Any) -> Migration:
    connection = amqp.connect(amqp.Broker.from_settings(settings), "intygstjanst topology --migrate")
    try:
        return Migrator(connection, settings).run()
    finally:
        if connection.is_open:
            connection.close()
