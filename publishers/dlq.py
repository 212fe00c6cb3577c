"""Operator tools for the dead-letter queues (CONTRACT §8), on a pika `BlockingConnection` channel.

Every function works through `basic_get` without auto-ack and holds the messages it has looked at unacknowledged
until it is done, so it never sees one message twice and always terminates: it handles at most the number of
messages the queue held when it started. Messages it does not remove are given back with `basic_nack(requeue=True)`.

What an operator sees of a dead letter is masked (`mask`): the body's shape and the few fields that identify no
one (certificate id, recipient, message type), never a personnummer, a name or a medical document; the raw body
is in `DeadLetter.body` for whoever explicitly asks for it (and logs that they did).

A dead letter comes either from the service (`x-intyg-error-code` says why) or from the broker itself, after a
message exceeded its queue's delivery limit (then only the broker's `x-death` / `x-first-death-reason` say why):
`DeadLetter.code` names both kinds, `broker:<reason>` for the latter, so that they can be grouped and selected
alike.

Browsing is therefore not free: a message that was looked at (by `peek`, or skipped by `replay`/`purge`) is
requeued, which sets its `redelivered` flag (and, on a quorum queue, counts as a delivery attempt), and while a
function runs the messages it holds are invisible to other consumers of the queue.
"""
from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError

from domain.privacy import scrub
from consumers.retry import rfc3339  # naive times are UTC: so is the broker's x-death time as pika gives it
from contracts.topology import (
    COMMANDS_EXCHANGE, CONSUMED_QUEUES, H_ATTEMPTS, H_DEAD_LETTERED_AT, H_ERROR, H_ERROR_CODE,
    H_ORIGINAL_ROUTING_KEY, H_ORIGINAL_USER_ID, dlq,
)

# What a replay removes: why it was dead-lettered (the replay is a new attempt), and the broker's own headers
# (`x-delivery-count`: a quorum DLQ adds it to a message that was browsed; `x-death` and friends: the broker's
# dead-lettering history). The service's signed bookkeeping (original routing key and sender, attempts) stays
# as it is, or its signature would no longer match: that is what lets the replay act as the original sender.
# The service starts a replay's retries afresh whatever its attempts say.
REPLAY_DROPS = frozenset({H_ERROR_CODE, H_ERROR, H_DEAD_LETTERED_AT, "x-delivery-count", "x-death",
                          "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason"})
# Body fields whose values identify no person and tell an operator what a message was about; every other value
# (patient, names, HSA ids, consent, free text such as a revoke's reason, the document) is masked. A value of
# these that looks like a personnummer anywhere (`domain.privacy.scrub`) is masked too.
UNMASKED_FIELDS = frozenset({"certificate_id", "id", "type", "type_version", "certificate_type", "recipient_id",
                             "sent_by", "test_certificate"})
MASK = "***"
BROKER_CODE_PREFIX = "broker:"

Progress = Callable[[int, int], None]  # (messages handled, messages to handle)


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    message_id: str | None
    routing_key: str | None  # the original routing key (what a replay publishes with)
    error_code: str | None  # the service's reason; None when the broker dead-lettered it
    error: str | None
    attempts: int | None
    dead_lettered_at: str | None
    body: bytes = field(repr=False)  # personal data: shown only on explicit request (`mask` otherwise)
    content_type: str | None = None
    user_id: str | None = None
    redelivered: bool = False
    headers: dict[str, Any] = field(default_factory=dict)
    broker_reason: str | None = None  # why the broker dead-lettered it (`delivery_limit`, `rejected`, ...)

    @property
    def code(self) -> str:
        """Why it is here, as dead letters are grouped and selected: the service's error code, or
        `broker:<reason>` for one the broker dead-lettered."""
        if self.error_code:
            return self.error_code
        return BROKER_CODE_PREFIX + (self.broker_reason or "unknown")

    @property
    def sender(self) -> str | None:
        """Who sent the message: the service's bookkeeping names the original sender, else its `user_id`."""
        return _text(self.headers.get(H_ORIGINAL_USER_ID)) or self.user_id

    @property
    def by_broker(self) -> bool:
        return not self.error_code

    @property
    def when(self) -> dt.datetime | None:
        return parse_time(self.dead_lettered_at)

    def masked_body(self) -> str:
        return mask(self.body)

    def as_json(self, *, reveal: bool = False) -> dict[str, Any]:
        """For tools; the body masked unless `reveal` (the caller logs that it revealed it)."""
        shown = {"body": self.body.decode("utf-8", errors="replace")} if reveal else {
            "body_masked": self.masked_body()}
        return {"queue": self.queue, "message_id": self.message_id, "routing_key": self.routing_key,
                "code": self.code, "error_code": self.error_code, "error": self.error,
                "dead_lettered_by": "broker" if self.by_broker else "service", "broker_reason": self.broker_reason,
                "attempts": self.attempts, "dead_lettered_at": self.dead_lettered_at,
                "body_size": len(self.body), **shown, "content_type": self.content_type, "user_id": self.user_id,
                "sender": self.sender,
                "redelivered": self.redelivered, "headers": _jsonable(self.headers)}


@dataclass(frozen=True)
class Filter:
    """Which dead letters a command acts on: any of `codes` (None: any), dead-lettered in [since, until)."""

    codes: frozenset[str] | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def __bool__(self) -> bool:
        return bool(self.codes) or self.since is not None or self.until is not None

    def matches(self, letter: DeadLetter) -> bool:
        if self.codes and letter.code not in self.codes:
            return False
        if self.since is None and self.until is None:
            return True
        when = letter.when
        if when is None:  # no time to compare: not selected by a time window
            return False
        return (self.since is None or when >= self.since) and (self.until is None or when < self.until)


@dataclass
class Group:
    """Dead letters of one queue that failed for the same reason (as ServicePulse groups failures)."""

    queue: str
    code: str
    count: int = 0
    oldest: str | None = None
    newest: str | None = None
    types: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # the reasons given, most common first

    def add(self, letter: DeadLetter) -> None:
        self.count += 1
        self.types[letter.routing_key or "?"] += 1
        self.errors[letter.error or (f"dead-lettered by the broker ({letter.broker_reason})" if letter.by_broker
                                     else "?")] += 1
        when = letter.when
        if when is not None:
            stamp = rfc3339(when)
            self.oldest = stamp if self.oldest is None or stamp < self.oldest else self.oldest
            self.newest = stamp if self.newest is None or stamp > self.newest else self.newest

    def as_json(self) -> dict[str, Any]:
        return {"queue": self.queue, "code": self.code, "count": self.count, "oldest": self.oldest,
                "newest": self.newest, "types": dict(self.types.most_common()),
                "errors": dict(self.errors.most_common())}


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
    error_code = _text(headers.get(H_ERROR_CODE))
    death = _first_death(headers)
    broker_reason = None if error_code else (_text(headers.get("x-first-death-reason")) or
                                             _text(death.get("reason")) or None)
    dead_lettered_at = _text(headers.get(H_DEAD_LETTERED_AT))
    if dead_lettered_at is None and isinstance(death.get("time"), dt.datetime):
        dead_lettered_at = rfc3339(death["time"])
    return DeadLetter(
        queue=queue, message_id=properties.message_id, routing_key=original_routing_key(properties),
        error_code=error_code, error=_text(headers.get(H_ERROR)), attempts=_int(headers.get(H_ATTEMPTS)),
        dead_lettered_at=dead_lettered_at, body=body, content_type=properties.content_type,
        user_id=properties.user_id, redelivered=redelivered, headers=headers, broker_reason=broker_reason)


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    """The broker's record of when it first dead-lettered the message (`x-death` lists the latest first)."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[-1], dict):
        return deaths[-1]
    return {}


def mask(body: bytes) -> str:
    """The body as an operator may see it without asking: its JSON shape, with every value masked but those of
    `UNMASKED_FIELDS` (and any personnummer-like number even there)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return f"({len(body)} bytes, not JSON)"
    return json.dumps(_masked(parsed, None), ensure_ascii=False, separators=(", ", ": "))


def _masked(value: Any, key: str | None) -> Any:
    if isinstance(value, dict):
        return {k: _masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, key) for v in value]
    if value is None:
        return None
    if key in UNMASKED_FIELDS and isinstance(value, (str, bool, int, float)):
        return MASK if isinstance(value, str) and scrub(value) != value else value
    return MASK


def summarize(letters: Iterable[DeadLetter]) -> list[Group]:
    """The dead letters grouped by queue and `code`, the largest group first."""
    groups: dict[tuple[str, str], Group] = {}
    for letter in letters:
        key = (letter.queue, letter.code)
        groups.setdefault(key, Group(*key)).add(letter)
    return sorted(groups.values(), key=lambda g: (-g.count, g.queue, g.code))


def parse_time(value: str | None) -> dt.datetime | None:
    """An RFC 3339 time (as the service writes it) as an aware datetime; a time without offset is UTC."""
    if not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


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


def peek(channel: Any, queue: str, limit: int | None = 20) -> list[DeadLetter]:
    """The first `limit` (None: all) dead letters of `queue`, left in the queue (requeued: see the module
    docstring)."""
    return list(browse(channel, queue, limit))


def browse(channel: Any, queue: str, limit: int | None = None) -> Iterator[DeadLetter]:
    """The dead letters of `queue` one by one, each held until the end and then requeued (consume the iterator to
    the end, or close it): whoever only counts them (`summarize`) keeps no body in memory."""
    count = message_count(channel, queue)
    total = count if limit is None else min(limit, count)
    seen, last_tag = 0, None
    try:
        for _ in range(total):
            method, properties, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            seen, last_tag = seen + 1, method.delivery_tag
            yield dead_letter(queue, properties, body, method.redelivered)
    finally:
        if last_tag is not None:
            channel.basic_nack(delivery_tag=last_tag, multiple=True, requeue=True)
            _wait_for_count(channel, queue, seen)


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
           progress_cb: Progress | None = None, publisher: str | None = None,
           where: Filter | None = None) -> ReplayResult:
    """Republish dead letters of `queue` to `intyg.commands` with their original routing key.

    `message_ids` None means every message; `where` narrows that down (say, every UNAVAILABLE since 18:00).
    A replayed message is the dead letter as it is (body, properties, `message_id`, the service's signed
    bookkeeping), less what `replay_properties` drops: why it was dead-lettered and the broker's own headers. CONTRACT §8's "unchanged" is read as: what the sender sent is
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

    _sweep(channel, queue, message_ids, where, progress_cb, replay_it, result)
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
          progress_cb: Progress | None = None, where: Filter | None = None) -> PurgeResult:
    """Remove dead letters for good: the ones with the given `message_ids`, or (None) every message that was in
    the queue at the start, narrowed down by `where`. The others are requeued."""
    result = PurgeResult(dry_run=dry_run)

    def purge_it(method: Any, _properties: Any, _body: bytes) -> bool:
        result.purged += 1
        if not dry_run:
            channel.basic_ack(delivery_tag=method.delivery_tag)
        return not dry_run

    _sweep(channel, queue, message_ids, where, progress_cb, purge_it, result)
    return result


def _sweep(channel: Any, queue: str, message_ids: Collection[str] | None, where: Filter | None,
           progress_cb: Progress | None, act: Any, result: ReplayResult | PurgeResult) -> None:
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
            if selected and where:
                selected = where.matches(dead_letter(queue, properties, body))
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


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
