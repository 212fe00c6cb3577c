"""A small client of the service's wire contract, for the demo, the end-to-end tests and the benchmarks:
publish a message to `intyg.commands` and wait for its reply on RabbitMQ's direct reply-to."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika

from contracts.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from publishers import amqp

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class ReplyTimeout(TimeoutError):
    pass


class Client:
    def __init__(self, amqp_url: str | amqp.Broker) -> None:
        self.connection = amqp.connect(amqp_url)
        self.channel = self.connection.channel()
        self._replies: dict[str, dict[str, Any]] = {}
        # Direct reply-to: consume before publishing, on the same channel, with auto-ack (RabbitMQ's rule).
        self.channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)

    def _on_reply(self, _channel, _method, properties, body: bytes) -> None:
        self._replies[properties.correlation_id] = json.loads(body)

    def publish(self, routing_key: str, body: dict[str, Any] | bytes, *, message_id: str | None = None,
                reply: bool = True, properties: dict[str, Any] | None = None) -> str:
        """Publish one message; returns its message_id (also the correlation id of its reply)."""
        message_id = message_id or str(uuid.uuid4())
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        props = {"message_id": message_id, "content_type": "application/json", "delivery_mode": 2,
                 **({"reply_to": DIRECT_REPLY_TO} if reply else {}), **(properties or {})}
        self.channel.basic_publish(COMMANDS_EXCHANGE, routing_key, raw, pika.BasicProperties(**props))
        return message_id

    def wait(self, correlation_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while correlation_id not in self._replies:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReplyTimeout(f"no reply to {correlation_id} within {timeout}s")
            self.connection.process_data_events(time_limit=min(remaining, 0.05))
        return self._replies.pop(correlation_id)

    def call(self, routing_key: str, body: dict[str, Any] | bytes, *, message_id: str | None = None,
             timeout: float = 10.0, properties: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.wait(self.publish(routing_key, body, message_id=message_id, properties=properties), timeout)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Listener:
    """An exclusive queue bound to `intyg.events` (or to a recipient's own queue), to watch what is published."""

    def __init__(self, amqp_url: str | amqp.Broker, binding: str = "#", queue: str | None = None) -> None:
        self.connection = amqp.connect(amqp_url)
        self.channel = self.connection.channel()
        if queue is None:
            queue = self.channel.queue_declare("", exclusive=True).method.queue
            self.channel.queue_bind(queue, EVENTS_EXCHANGE, binding)
        self.queue = queue

    def messages(self, timeout: float = 5.0) -> Iterator[tuple[str, dict[str, Any], pika.BasicProperties]]:
        """(routing key, body, properties) of each message until none arrives for `timeout` seconds."""
        for method, properties, body in self.channel.consume(self.queue, inactivity_timeout=timeout):
            if method is None:
                break
            self.channel.basic_ack(method.delivery_tag)
            yield method.routing_key, json.loads(body), properties
        self.channel.cancel()

    def expect(self, routing_key: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next message with this routing key (others are consumed and dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, _properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                self.connection.sleep(0.02)
                continue
            if method.routing_key == routing_key:
                return json.loads(body)
        raise ReplyTimeout(f"no {routing_key} within {timeout}s")

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()
