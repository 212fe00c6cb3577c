"""Operator tools for the dead-letter queues (CONTRACT §8), on a pika `BlockingConnection` channel.

Every function works through `basic_get` without auto-ack and holds the messages it has looked at unacknowledged
until it is done, so it never sees one message twice and always terminates: it handles at most the number of
messages the queue held when it started. Messages it does not remove are given back with `basic_nack(requeue=True)`.

Browsing is therefore not free: a message that was looked at (by `peek`, or skipped by `replay`/`purge`) is
requeued, which sets its `redelivered` flag (and, on a quorum queue, counts as a delivery attempt), and while a
function runs the messages it holds are invisible to other consumers of the queue.
"""
from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError

from contracts.topology import (
    COMMANDS_EXCHANGE, CONSUMED_QUEUES, H_ATTEMPTS, H_DEAD_LETTERED_AT, H_ERROR, H_ERROR_CODE,
    H_ORIGINAL_ROUTING_KEY, dlq,
)

# What a replay removes: why it was dead-lettered (the replay is a new attempt), and the broker's own headers
# (`x-delivery-count`: a quorum DLQ adds it to a message that was browsed; `x-death` and friends: the broker's
# dead-lettering history). The service's signed bookkeeping (original routing key and sender, attempts) stays
# as it is, or its signature would no longer match: that is what lets the replay act as the original sender.
# The service starts a replay's retries afresh whatever its attempts say.
REPLAY_DROPS = frozenset({H_ERROR_CODE, H_ERROR, H_DEAD_LETTERED_AT, "x-delivery-count", "x-death",
                          "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason"})
PREVIEW_CHARS = 200
# A personnummer or samordningsnummer anywhere in a preview (YYYYMMDD[-+]NNNN, or the 10-digit form).
_PERSONNUMMER = re.compile(r"(?<!\d)(?:\d{2})?\d{6}[-+]?\d{4}(?!\d)")

Progress = Callable[[int, int], None]  # (messages handled, messages to handle)


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    message_id: str | None
    routing_key: str | None  # the original routing key (what a replay publishes with)
    error_code: str | None
    error: str | None
    attempts: int | None
    dead_lettered_at: str | None
    body_preview: str
    body_size: int
    content_type: str | None = None
    user_id: str | None = None
    redelivered: bool = False
    headers: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"queue": self.queue, "message_id": self.message_id, "routing_key": self.routing_key,
                "error_code": self.error_code, "error": self.error, "attempts": self.attempts,
                "dead_lettered_at": self.dead_lettered_at, "body_size": self.body_size,
                "body_preview": self.body_preview, "content_type": self.content_type, "user_id": self.user_id,
                "redelivered": self.redelivered, "headers": _jsonable(self.headers)}


@dataclass
class ReplayResult:
    seen: int = 0  # messages looked at
    selected: int = 0  # messages chosen by id (or all)
    replayed: int = 0  # republished, confirmed and removed from the DLQ (dry run: would be)
    failed: int = 0  # selected but not republished (no original routing key, unroutable, nacked): kept
    requeued: int = 0  # given back to the DLQ
    not_found: set[str] = field(default_factory=set)  # requested ids not among the messages looked at
    errors: list[str] = field(default_factory=list)
    dry_run: bool = False


@dataclass
class PurgeResult:
    seen: int = 0
    purged: int = 0  # removed (dry run: would be)
    requeued: int = 0
    not_found: set[str] = field(default_factory=set)
    dry_run: bool = False


# --- queue names ------------------------------------------------------------------------------------------------
def dlq_names() -> list[str]:
    return [dlq(queue) for queue in CONSUMED_QUEUES]


def resolve_queue(name: str) -> str:
    """`intyg.status` or `intyg.status.dlq` -> `intyg.status.dlq`; anything else is a ValueError."""
    if name in CONSUMED_QUEUES:
        return dlq(name)
    if name in dlq_names():
        return name
    known = ", ".join(CONSUMED_QUEUES)
    raise ValueError(f"unknown queue {name!r}: expected one of {known} (with or without .dlq)")


# --- reading ----------------------------------------------------------------------------------------------------
def message_count(channel: Any, queue: str) -> int:
    """Ready messages in `queue` (a passive declare; raises ChannelClosedByBroker 404 if it does not exist)."""
    return channel.queue_declare(queue, passive=True).method.message_count


def list_dlqs(channel: Any) -> list[tuple[str, int | None]]:
    """`(dlq, ready messages)` for the four service DLQs; None for a DLQ that does not exist. Each check runs on a
    channel of its own (a missing queue closes the channel that asked), so `channel` stays usable."""
    result: list[tuple[str, int | None]] = []
    for queue in dlq_names():
        probe = channel.connection.channel()
        try:
            result.append((queue, message_count(probe, queue)))
        except ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            result.append((queue, None))
            continue
        probe.close()
    return result


def dead_letter(queue: str, properties: Any, body: bytes, redelivered: bool = False) -> DeadLetter:
    headers = dict(properties.headers or {})
    attempts = headers.get(H_ATTEMPTS)
    try:
        attempts = int(attempts) if attempts is not None else None
    except (TypeError, ValueError):
        attempts = None
    return DeadLetter(
        queue=queue, message_id=properties.message_id, routing_key=original_routing_key(properties),
        error_code=_text(headers.get(H_ERROR_CODE)), error=_text(headers.get(H_ERROR)), attempts=attempts,
        dead_lettered_at=_text(headers.get(H_DEAD_LETTERED_AT)), body_preview=preview(body), body_size=len(body),
        content_type=properties.content_type, user_id=properties.user_id, redelivered=redelivered, headers=headers)


def preview(body: bytes, chars: int = PREVIEW_CHARS) -> str:
    """The start of the body as text, personnummer masked: it is for an operator's screen, not for the logs."""
    text = body[: chars * 4].decode("utf-8", errors="replace")
    text = _PERSONNUMMER.sub(lambda m: "*" * len(m.group(0)), text)
    return text if len(text) <= chars else text[:chars] + "…"


def original_routing_key(properties: Any) -> str | None:
    headers = properties.headers or {}
    key = _text(headers.get(H_ORIGINAL_ROUTING_KEY))
    if key:
        return key
    for death in headers.get("x-death") or ():  # dead-lettered by the broker rather than by the service
        keys = death.get("routing-keys") if isinstance(death, dict) else None
        if keys:
            return _text(keys[0])
    return None


def peek(channel: Any, queue: str, limit: int = 20) -> list[DeadLetter]:
    """The first `limit` dead letters of `queue`, left in the queue (requeued: see the module docstring)."""
    total = min(limit, message_count(channel, queue))
    letters: list[DeadLetter] = []
    last_tag = None
    try:
        for _ in range(total):
            method, properties, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            last_tag = method.delivery_tag
            letters.append(dead_letter(queue, properties, body, method.redelivered))
    finally:
        if last_tag is not None:
            channel.basic_nack(delivery_tag=last_tag, multiple=True, requeue=True)
            _wait_for_count(channel, queue, len(letters))
    return letters


# --- changing -----------------------------------------------------------------------------------------------------
def replay_properties(properties: Any, publisher: str | None) -> pika.BasicProperties:
    """The dead letter's properties as they are republished: unchanged but for `REPLAY_DROPS`, and `user_id`,
    which names the publisher (the broker refuses any other): the service tells an operator's replay by it and
    lets it act as the original sender that the service's signed bookkeeping names; never as anyone a header
    names that the service did not sign. A dead letter without that bookkeeping (the broker dead-lettered it
    after its delivery limit) acts as the operator who replays it."""
    headers = {k: v for k, v in (properties.headers or {}).items() if k not in REPLAY_DROPS}
    user_id = publisher or None
    return pika.BasicProperties(
        content_type=properties.content_type, content_encoding=properties.content_encoding,
        headers=headers or None, delivery_mode=properties.delivery_mode or 2, priority=properties.priority,
        correlation_id=properties.correlation_id, reply_to=properties.reply_to, expiration=properties.expiration,
        message_id=properties.message_id, timestamp=properties.timestamp, type=properties.type, user_id=user_id,
        app_id=properties.app_id, cluster_id=properties.cluster_id)


def replay(channel: Any, queue: str, message_ids: Collection[str] | None = None, *, dry_run: bool = False,
           progress_cb: Progress | None = None, publisher: str | None = None) -> ReplayResult:
    """Republish dead letters of `queue` to `intyg.commands` with their original routing key.

    `message_ids` None means every message. A replayed message is the dead letter as it is (body, properties,
    `message_id`, the service's signed bookkeeping), less what `replay_properties` drops: why it was
    dead-lettered and the broker's own headers. CONTRACT §8's "unchanged" is read as: what the sender sent is
    unchanged. The service gives a replay fresh retries and lets it act as its original sender only through the
    bookkeeping it signed itself.

    The channel is put in confirm mode; each dead letter is removed (acked) only after its republish is confirmed
    (publishes are `mandatory`: if nothing is bound for the routing key the dead letter is kept). Messages not
    selected, and with `dry_run` all of them, are requeued. At most the number of messages in the queue at the
    start is looked at (every one of them, so that all copies of a selected id are replayed).
    """
    result = ReplayResult(dry_run=dry_run)
    publisher = publisher if publisher is not None else connection_user(channel)
    if not dry_run and not getattr(channel, "_delivery_confirmation", False):
        channel.confirm_delivery()

    def replay_it(method: Any, properties: Any, body: bytes) -> bool:
        result.selected += 1
        return _replay_one(channel, queue, method, properties, body, publisher, dry_run, result) and not dry_run

    _sweep(channel, queue, message_ids, progress_cb, replay_it, result)
    return result


def _replay_one(channel: Any, queue: str, method: Any, properties: Any, body: bytes, publisher: str | None,
                dry_run: bool, result: ReplayResult) -> bool:
    routing_key = original_routing_key(properties)
    if not routing_key:
        result.failed += 1
        result.errors.append(f"{properties.message_id}: no {H_ORIGINAL_ROUTING_KEY} header, kept")
        return False
    if dry_run:
        result.replayed += 1
        return True
    try:
        channel.basic_publish(COMMANDS_EXCHANGE, routing_key, body, replay_properties(properties, publisher),
                              mandatory=True)
    except (UnroutableError, NackError) as exc:
        result.failed += 1
        reason = "unroutable" if isinstance(exc, UnroutableError) else "nacked"
        result.errors.append(f"{properties.message_id}: {reason} ({routing_key}), kept")
        return False
    channel.basic_ack(delivery_tag=method.delivery_tag)
    result.replayed += 1
    return True


def purge(channel: Any, queue: str, message_ids: Collection[str] | None = None, *, dry_run: bool = False,
          progress_cb: Progress | None = None) -> PurgeResult:
    """Remove dead letters for good: the ones with the given `message_ids`, or (None) every message that was in
    the queue at the start. The others are requeued."""
    result = PurgeResult(dry_run=dry_run)

    def purge_it(method: Any, _properties: Any, _body: bytes) -> bool:
        result.purged += 1
        if not dry_run:
            channel.basic_ack(delivery_tag=method.delivery_tag)
        return not dry_run

    _sweep(channel, queue, message_ids, progress_cb, purge_it, result)
    return result


def _sweep(channel: Any, queue: str, message_ids: Collection[str] | None, progress_cb: Progress | None,
           act: Any, result: ReplayResult | PurgeResult) -> None:
    """Look once at each message that was in `queue` at the start; `act` on the selected ones (it says whether it
    took the message out of the queue). Every message not taken is held until the end and then requeued, so no
    message is looked at twice and the sweep ends even on a busy queue."""
    wanted = None if message_ids is None else set(message_ids)
    held: list[int] = []
    found: set[str] = set()
    total = message_count(channel, queue)
    try:
        for _ in range(total):
            method, properties, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            result.seen += 1
            selected = wanted is None or properties.message_id in wanted
            if selected and properties.message_id is not None:
                found.add(properties.message_id)
            if not (selected and act(method, properties, body)):
                held.append(method.delivery_tag)
            if progress_cb is not None:
                progress_cb(result.seen, total)
    finally:
        result.requeued = _requeue(channel, queue, held)
    if wanted is not None:
        result.not_found = wanted - found


def _requeue(channel: Any, queue: str, tags: Iterable[int], settle_s: float = 5.0) -> int:
    """Give the held messages back, then wait (a little) until the queue counts them again: a quorum queue applies
    requeues asynchronously, and the next command (say `show` right after `replay`) should see them."""
    tags = list(tags)
    if not tags or not channel.is_open:
        return 0
    for tag in tags:
        channel.basic_nack(delivery_tag=tag, multiple=False, requeue=True)
    _wait_for_count(channel, queue, len(tags), settle_s)
    return len(tags)


def _wait_for_count(channel: Any, queue: str, at_least: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while message_count(channel, queue) < at_least and time.monotonic() < deadline:
        channel.connection.sleep(0.01)


def connection_user(channel: Any) -> str | None:
    """The user the channel's connection logged in as (what the broker checks `user_id` against)."""
    try:
        return channel.connection._impl.params.credentials.username
    except AttributeError:  # pragma: no cover - another connection class
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
