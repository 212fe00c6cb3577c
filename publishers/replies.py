"""Publishing straight from a consumer thread, on that thread's own connection (pika is not thread-safe):
query replies, error replies to invalid messages, retry copies and dead letters.

The channel is in confirm mode and every publish waits for the broker's ack, so the loop acknowledges a delivery
only once what replaces it is safely with the broker. A nack raises `NackError`; a copy that no queue takes
(`mandatory=True`, e.g. an operator deleted the DLQ) raises `UnroutableError`. Replies are published with
`mandatory=False`: a requester that went away (its reply queue is gone) must not hold anything up.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pika
from pika.exceptions import NackError, UnroutableError

from contracts.replies import Reply
from storage.outbox import OutboxMessage

__all__ = ["DirectPublisher", "NackError", "UnroutableError", "copy_properties"]

PERSISTENT = pika.DeliveryMode.Persistent


class DirectPublisher:
    """Wraps a BlockingChannel (opened for publishing only) in confirm mode."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_delivery()

    def reply(self, reply_to: str, reply: Reply, *, correlation_id: str | None,
              headers: Mapping[str, Any] | None = None) -> None:
        """A reply to the default exchange with `reply_to` as routing key (works with amq.rabbitmq.reply-to);
        `headers`: the trace context of the handling it answers."""
        self.message(OutboxMessage(kind="reply", exchange="", routing_key=reply_to,
                                   message_id=f"reply-{reply.request_id}", correlation_id=correlation_id,
                                   body=reply.model_dump_json().encode(), headers=headers or {}))

    def message(self, message: OutboxMessage) -> None:
        """An outbox-shaped message (as `pipeline.reply_message` builds one), published at once."""
        mandatory = message.kind != "reply"
        properties = pika.BasicProperties(
            content_type=message.content_type, delivery_mode=PERSISTENT, message_id=message.message_id,
            correlation_id=message.correlation_id, headers=dict(message.headers) or None,
            type=message.routing_key if message.kind == "event" else None)
        self.channel.basic_publish(message.exchange, message.routing_key, message.body, properties,
                                   mandatory=mandatory)

    def copy(self, queue: str, body: bytes, properties: pika.BasicProperties) -> None:
        """A retry copy or a dead letter, straight into `queue` (default exchange); raises unless confirmed."""
        self.channel.basic_publish("", queue, body, properties, mandatory=True)


def copy_properties(envelope: Any, headers: Mapping[str, Any], *, user_id: str | None = None) -> pika.BasicProperties:
    """The properties of a retry copy or a dead letter: the message's own, as the service checked them
    (`consumers.envelope.Envelope`: a property that was not usable text is left out), with the service's headers,
    made persistent. Nothing else of the client's is copied (no expiration: a dead letter must not expire; no
    app_id, cluster_id, priority). `user_id`: our own broker user marks a retry copy as ours (the broker refuses
    any other user's id, so the original sender travels in the signed bookkeeping headers)."""
    return pika.BasicProperties(
        content_type=envelope.content_type,
        headers=dict(headers),
        delivery_mode=PERSISTENT,
        correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to,
        message_id=envelope.message_id,
        type=envelope.type,
        user_id=user_id,
    )
