"""From an AMQP delivery to the parts of it the service may use (CONTRACT §2, §8).

Every publisher is a possible attacker, so nothing of a delivery is used before it is checked here:
- the properties the service reads (`message_id`, `reply_to`, `correlation_id`, `type`, `content_type`) must be
  text: UTF-8 (pika hands over bytes when they are not), no NUL, bounded length. One that is not makes the message
  INVALID_MESSAGE (`Envelope.problem`); a `reply_to` or `message_id` that is not usable is not used for the reply;
  nor is a `reply_to` that names one of the service's own or a recipient's queues (the reply would land there);
- `user_id` is the one the broker verified when the client published (RabbitMQ refuses any other);
- headers are not read, with two exceptions: the W3C trace context (`CLIENT_HEADERS_KEPT`, checked and copied on
  what the service republishes), and the service's own bookkeeping (`consumers.retry`), trusted only when its
  signature shows that the service wrote it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consumers import retry
from contracts.properties import MESSAGE_ID_MAX_LENGTH as MAX_MESSAGE_ID
from contracts.properties import SHORT_TEXT_MAX_LENGTH as MAX_SHORT_TEXT
from contracts.topology import CLIENT_HEADERS_KEPT, OWN_QUEUE_PREFIXES
MAX_TRACE_HEADER = 512
_TRACE_TEXT = re.compile(r"[\x20-\x7e]*")  # W3C trace context is printable ASCII


@dataclass(frozen=True)
class Delivery:
    """A delivery as pika gave it."""

    tag: int
    exchange: str
    routing_key: str
    properties: Any  # pika.BasicProperties
    body: bytes


@dataclass(frozen=True)
class Envelope:
    """The checked parts of a message that the service reads."""

    routing_key: str
    body: bytes
    message_id: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    type: str | None = None
    user_id: str | None = None  # the acting broker user: verified by the broker, or by our own signed bookkeeping
    content_type: str | None = None
    origin_user: str | None = None  # a replayed dead letter's original sender, from bookkeeping we signed
    trace: Mapping[str, str] = field(default_factory=dict)  # client headers kept on republished copies
    problem: str | None = None  # why the message is INVALID_MESSAGE before its body is even read

    @property
    def reply_correlation_id(self) -> str | None:
        return self.correlation_id or self.message_id


@dataclass(frozen=True)
class Reader:
    """Reads the deliveries of one consumed queue."""

    queue: str
    own_user: str | None  # the service's broker user: only it can publish a retry copy
    signer: retry.Signer

    def read(self, delivery: Delivery, now: Any) -> tuple[Envelope, retry.History]:
        props = delivery.properties
        problems: list[str] = []
        message_id = _text(props.message_id, "message_id", MAX_MESSAGE_ID, problems, required=True)
        reply_to = _text(props.reply_to, "reply_to", MAX_SHORT_TEXT, problems)
        if reply_to is not None and reply_to.startswith(OWN_QUEUE_PREFIXES):
            problems.append("reply_to names a queue of the service or of a recipient")
            reply_to = None
        correlation_id = _text(props.correlation_id, "correlation_id", MAX_SHORT_TEXT, problems)
        kind = _text(props.type, "type", MAX_SHORT_TEXT, problems)
        content_type = _text(props.content_type, "content_type", MAX_SHORT_TEXT, problems)
        user_id = props.user_id if isinstance(props.user_id, str) and props.user_id else None
        headers = props.headers if isinstance(props.headers, Mapping) else {}

        routing_key, origin_user = delivery.routing_key, None
        past = retry.History.fresh(now)
        signed = self.signer.verified(headers, message_id)
        if retry.came_back(delivery.exchange, delivery.routing_key, self.queue) and user_id == self.own_user:
            # Our own retry copy back from its delay queue: it acts as the original sender, under the original
            # routing key, with the attempts so far; all of that only if we signed it.
            if signed is None:
                problems.append("retry bookkeeping was not written by this service")
            else:
                past = signed.history(now)
                routing_key, user_id = signed.routing_key, signed.user_id
        elif signed is not None:
            origin_user = signed.user_id  # counts only when an operator replays it (pipeline.authorize)
        # Any other x-intyg-* header is a client's: never read (§2), and never copied (`kept_client_headers`).

        envelope = Envelope(routing_key=routing_key, body=delivery.body, message_id=message_id, reply_to=reply_to,
                            correlation_id=correlation_id, type=kind, user_id=user_id, content_type=content_type,
                            origin_user=origin_user, trace=kept_client_headers(headers),
                            problem="; ".join(problems) or None)
        return envelope, past


def kept_client_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """The client headers on the allow-list, when they are what they claim to be; everything else is dropped."""
    kept = {}
    for name in CLIENT_HEADERS_KEPT:
        value = headers.get(name)
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                continue
        if isinstance(value, str) and len(value) <= MAX_TRACE_HEADER and _TRACE_TEXT.fullmatch(value):
            kept[name] = value
    return kept


def _text(value: Any, name: str, limit: int, problems: list[str], *, required: bool = False) -> str | None:
    """`value` if it is usable text, else None (and, when it was there, a problem naming it; never its value)."""
    if value is None or value == "":
        if required:
            problems.append(f"{name} is required (1-{limit} characters)")
        return None
    if isinstance(value, bytes):
        problems.append(f"{name} is not UTF-8")
        return None
    if not isinstance(value, str):
        problems.append(f"{name} is not text")
        return None
    if "\x00" in value:
        problems.append(f"{name} contains NUL")
        return None
    if len(value) > limit:
        problems.append(f"{name} is longer than {limit} characters")
        return None
    return value
