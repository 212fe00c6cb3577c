"""Publishing straight from a consumer thread, on that thread's own connection (pika is not thread-safe): every
reply, retry copies and dead letters.

Replies (`ReplyBatch`) go out after the batch's commit and before its acks, in one AMQP transaction per batch:
`tx.commit-ok` comes once the broker holds every reply of it, so the loop acknowledges a delivery only once its
reply is safely with the broker, at the cost of one round trip per batch (pika's BlockingChannel in confirm mode
waits for every publish's confirm: a round trip per reply). A crash after the database commit and before the acks
loses nothing: the broker redelivers, and the inbox answers with the stored reply (CONTRACT §2, §8). Replies are
published without `mandatory`: a requester that went away (its reply queue is gone) must not hold anything up.

Retry copies and dead letters (`DirectPublisher`) are rare: each waits for its own confirm. A nack raises
`NackError`; a copy that no queue takes (`mandatory=True`, e.g. an operator deleted the DLQ) raises
`UnroutableError`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pika
from pika.exceptions import NackError, UnroutableError

from contracts.replies import Reply
from publishers import frames

__all__ = ["DirectPublisher", "NackError", "ReplyBatch", "UnroutableError", "copy_properties"]

PERSISTENT = pika.DeliveryMode.Persistent


class ReplyBatch:
    """Wraps a BlockingChannel (opened for replies only) in transaction mode; `commit()` once per batch."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        channel.tx_select()
        self.pending = 0

    def add(self, reply_to: str, reply: Reply, *, correlation_id: str | None,
            headers: Mapping[str, Any] | None = None) -> None:
        """A reply to the default exchange with `reply_to` as routing key (works with amq.rabbitmq.reply-to);
        `headers`: the trace context of the handling it answers. Sent, with the others, at `commit()`."""
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=PERSISTENT,
                                          message_id=f"reply-{reply.request_id}", correlation_id=correlation_id,
                                          headers=dict(headers) if headers else None)
        frames.publish_buffered(self.channel, "", reply_to, reply.model_dump_json().encode(), properties)
        self.pending += 1

    def commit(self) -> None:
        """Returns once the broker holds every reply added since the last commit."""
        if self.pending:
            self.channel.tx_commit()
            self.pending = 0


class DirectPublisher:
    """Wraps a BlockingChannel (opened for publishing only) in confirm mode."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_delivery()

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
