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

from collections.abc import Callable, Mapping
from typing import Any

import pika
from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError

from contracts.replies import Reply
from publishers import frames

__all__ = ["DirectPublisher", "NackError", "ReplyBatch", "UnroutableError", "copy_properties"]

PERSISTENT = pika.DeliveryMode.Persistent


class ReplyBatch:
    """The replies of a batch, in one AMQP transaction on a channel of their own; `commit()` once per batch.

    A queue that refuses a reply (a requester's own queue declared with `x-overflow: reject-publish`, full) makes
    the broker fail the whole transaction ("partial tx completion") and close the channel; raised to the loop,
    that would end the session and have the whole batch redelivered, every time, until the broker dead-letters
    all of it at its delivery limit. So the batch's replies go out once more, each with its own publisher
    confirm, and a refused one is that requester's loss alone, as a reply queue that is gone is. Replies the
    failed transaction delivered arrive twice."""

    def __init__(self, open_channel: Callable[[], Any]) -> None:
        self._open = open_channel
        self.channel = self._transactional()
        self._batch: list[tuple[str, Reply, pika.BasicProperties]] = []  # the Reply, not its bytes: no copy kept

    @property
    def pending(self) -> int:
        return len(self._batch)

    def _transactional(self) -> Any:
        channel = self._open()
        channel.tx_select()
        return channel

    def add(self, reply_to: str, reply: Reply, *, correlation_id: str | None,
            headers: Mapping[str, Any] | None = None) -> None:
        """A reply to the default exchange with `reply_to` as routing key (works with amq.rabbitmq.reply-to);
        `headers`: the trace context of the handling it answers. Sent, with the others, at `commit()`."""
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=PERSISTENT,
                                          message_id=reply_message_id(reply.request_id),
                                          correlation_id=correlation_id, headers=dict(headers) if headers else None)
        frames.publish_buffered(self.channel, "", reply_to, reply.model_dump_json().encode(), properties)
        self._batch.append((reply_to, reply, properties))

    def commit(self) -> int:
        """Returns once the broker holds every reply added since the last commit, or a requester's queue refused
        it: how many were refused."""
        if not self._batch:
            return 0
        batch, self._batch = self._batch, []
        try:
            self.channel.tx_commit()
            return 0
        except ChannelClosedByBroker:  # this channel alone: a broken connection raises something else
            self.channel = self._transactional()
            return self._one_by_one(batch)

    def _one_by_one(self, batch: list[tuple[str, Reply, pika.BasicProperties]]) -> int:
        channel = self._open()
        channel.confirm_delivery()
        refused = 0
        for reply_to, reply, properties in batch:
            try:
                channel.basic_publish("", reply_to, reply.model_dump_json().encode(), properties)
            except NackError:
                refused += 1
        channel.close()
        return refused


def reply_message_id(request_id: str) -> str:
    """`reply-` and the request's message_id, cut to the 255 bytes of an AMQP short string. The contract's 128
    characters of a message_id may be up to 255 bytes of UTF-8; a property pika cannot encode raises an AMQPError,
    which would end the session and lose the replies of the whole batch."""
    message_id = f"reply-{request_id}"
    encoded = message_id.encode()
    return message_id if len(encoded) <= 255 else encoded[:255].decode(errors="ignore")


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
