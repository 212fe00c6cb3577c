"""Retry and dead-letter policy (CONTRACT §8), as pure functions of (headers, settings, now): no pika, no clock.

How a retry travels: the loop acknowledges the message only after publishing a copy (same body, properties and
`message_id`, plus the headers below) to a delay queue `Q.retry.<ms>ms`. That queue has a message TTL and
dead-letters expired messages to the default exchange with routing key `Q`, so the copy comes back to `Q` after
the delay, with routing key `Q` (hence `x-intyg-original-routing-key`).

Transient faults are retried once per entry of `retry_delays_s`, in that order: with the default
`[1, 2, 5, 10, 30]` a message is tried 6 times over about 48 s, then answered UNAVAILABLE and dead-lettered.
Anything else that fails (a bug, a value the database refuses) fails the same way next time: it is answered and
dead-lettered at once (`consumers.outcome`).
A revoke that overtook its register is retried (delays from the same list, the last one repeated) for as long as
`revoke_wait_s` has not passed since its first attempt, then answered NOT_FOUND and dead-lettered.

Only a message that came back from our own retry queue counts earlier attempts, and only if the service signed
its bookkeeping (`Signer`); a fresh message or an operator's replay of a dead letter starts again from attempt 1
(a replay after the database came back must not be dead-lettered at once because its copy says "6 attempts").
What the service republishes carries none of the client's headers but the allow-listed trace context: no `CC`
or `BCC` (which would make the broker copy our publish into a queue the client chose) and no client
`x-intyg-*` header.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from contracts.topology import (
    H_ATTEMPTS,
    H_DEAD_LETTERED_AT,
    H_ERROR,
    H_ERROR_CODE,
    H_FIRST_ATTEMPT_AT,
    H_ORIGINAL_ROUTING_KEY,
    H_ORIGINAL_USER_ID,
    H_SIGNATURE,
)

# What the signature covers, besides the message id (see `Signer`).
SIGNED_HEADERS = (H_ORIGINAL_ROUTING_KEY, H_ORIGINAL_USER_ID, H_ATTEMPTS, H_FIRST_ATTEMPT_AT)

MAX_ERROR_LENGTH = 500


class RetrySettings(Protocol):
    retry_delays_s: Sequence[float]
    revoke_wait_s: float


def retry_queue(queue: str, delay_s: float) -> str:
    """`intyg.status.retry.5000ms`: the delay queue of `queue` for one delay."""
    return f"{queue}.retry.{delay_ms(delay_s)}ms"


def delay_ms(delay_s: float) -> int:
    return max(1, int(round(delay_s * 1000)))


def retry_queues(queue: str, settings: RetrySettings) -> dict[str, int]:
    """Every delay queue of `queue`: name -> TTL in ms (duplicated delays share one queue)."""
    return {retry_queue(queue, d): delay_ms(d) for d in settings.retry_delays_s}


def came_back(exchange: str, routing_key: str, queue: str) -> bool:
    """Whether a delivery is one of our retry copies returning from a delay queue: delay queues dead-letter to
    the default exchange with the service queue's name as routing key, which no command ever carries."""
    return exchange == "" and routing_key == queue


@dataclass(frozen=True)
class History:
    """What earlier attempts of this message left in its (signed) bookkeeping."""

    attempts: int  # attempts before this delivery
    first_attempt_at: dt.datetime

    @classmethod
    def fresh(cls, now: dt.datetime) -> History:
        return cls(0, now)

    @property
    def attempt(self) -> int:
        """The number of the attempt being made now (1 = first)."""
        return self.attempts + 1


@dataclass(frozen=True)
class Bookkeeping:
    """The service's own headers on a retry copy or a dead letter, as it wrote and signed them."""

    routing_key: str
    user_id: str | None
    attempts: int
    first_attempt_at: dt.datetime

    def history(self, now: dt.datetime) -> History:
        return History(self.attempts, self.first_attempt_at if self.first_attempt_at <= now else now)


class Signer:
    """HMAC-SHA256 over the bookkeeping the service trusts when a copy comes back (message id, original routing
    key, original sender, attempts, first attempt), so a copy whose `x-intyg-*` headers the service did not write
    is recognised even when it arrives through the service's own broker user or an operator's replay. Every
    instance of one deployment must share the key."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("a signing key is required")
        self._key = key

    def sign(self, message_id: str | None, headers: Mapping[str, Any]) -> str:
        return hmac.new(self._key, _signed_text(message_id, headers), hashlib.sha256).hexdigest()

    def verified(self, headers: Mapping[str, Any], message_id: str | None) -> Bookkeeping | None:
        """The bookkeeping in `headers`, if this service signed exactly it for this message; else None."""
        signature = headers.get(H_SIGNATURE)
        if isinstance(signature, bytes):
            signature = signature.decode("ascii", errors="replace")
        if not isinstance(signature, str) or not message_id:
            return None
        if not hmac.compare_digest(signature, self.sign(message_id, headers)):
            return None
        routing_key = _str(headers.get(H_ORIGINAL_ROUTING_KEY))
        first = _time(headers.get(H_FIRST_ATTEMPT_AT))
        if routing_key is None or first is None:
            return None
        return Bookkeeping(routing_key, _str(headers.get(H_ORIGINAL_USER_ID)), _int(headers.get(H_ATTEMPTS)), first)


def _signed_text(message_id: str | None, headers: Mapping[str, Any]) -> bytes:
    parts = [message_id or ""] + [_canonical(headers.get(name)) for name in SIGNED_HEADERS]
    return "\x1f".join(parts).encode("utf-8", errors="replace")


def _canonical(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_s: float | None  # when retry
    attempt: int  # the attempt that just failed (1 = first)
    limit: int | None  # how many retries a transient fault gets; None for the revoke window

    @property
    def describe(self) -> str:
        """`retrying in 5s (attempt 3/6)` for a log line."""
        if not self.retry:
            return f"giving up after {self.attempt} attempt{'s' if self.attempt != 1 else ''}"
        of = f"/{self.limit + 1}" if self.limit is not None else ""
        return f"retrying in {_seconds(self.delay_s or 0)} (attempt {self.attempt}{of})"


def next_delay(attempt: int, settings: RetrySettings) -> float:
    """The delay after failed attempt number `attempt` (1-based): the list in order, its last entry repeated."""
    delays = list(settings.retry_delays_s)
    if not delays:
        return 0.0
    return float(delays[min(max(attempt, 1), len(delays)) - 1])


def transient_exhausted(attempt: int, settings: RetrySettings) -> bool:
    """True when attempt number `attempt` failed and every delay of `retry_delays_s` has been used once."""
    return attempt > len(settings.retry_delays_s)


def after_fault(past: History, settings: RetrySettings) -> Decision:
    """A transient fault (or a bug) on this attempt: retry with back-off, or give up (UNAVAILABLE + DLQ)."""
    attempt = past.attempt
    limit = len(settings.retry_delays_s)
    if transient_exhausted(attempt, settings):
        return Decision(False, None, attempt, limit)
    return Decision(True, next_delay(attempt, settings), attempt, limit)


def revoke_wait_exceeded(past: History, settings: RetrySettings, now: dt.datetime) -> bool:
    return (now - past.first_attempt_at).total_seconds() >= settings.revoke_wait_s


def after_not_yet(past: History, settings: RetrySettings, now: dt.datetime) -> Decision:
    """A revoke that overtook its register: wait with back-off until `revoke_wait_s` since its first attempt."""
    attempt = past.attempt
    if revoke_wait_exceeded(past, settings, now) or not settings.retry_delays_s:
        return Decision(False, None, attempt, None)
    return Decision(True, next_delay(attempt, settings), attempt, None)


def retry_headers(kept: Mapping[str, str], message_id: str | None, past: History, routing_key: str, *,
                  user_id: str | None, code: str, error: str, signer: Signer) -> dict[str, Any]:
    """The headers of a retry copy: the client headers on the allow-list (`kept`), and the service's signed
    bookkeeping: attempts so far, the original routing key and sender (the copy cannot carry the sender as
    `user_id`: the broker only lets us publish our own), when it was first tried; and why it is retried."""
    out: dict[str, Any] = dict(kept)
    out[H_ERROR_CODE] = code
    out[H_ERROR] = error[:MAX_ERROR_LENGTH]
    return _signed(out, message_id, past, routing_key, user_id, signer)


def dead_letter_headers(kept: Mapping[str, str], message_id: str | None, past: History, routing_key: str, *,
                        user_id: str | None, code: str, error: str, now: dt.datetime, signer: Signer) -> dict[str, Any]:
    """The headers of a dead letter (§8): error code and text, attempts, original routing key and sender (signed,
    so that an operator's replay acts as that sender), when."""
    out: dict[str, Any] = dict(kept)
    out[H_ERROR_CODE] = code
    out[H_ERROR] = error[:MAX_ERROR_LENGTH]
    out[H_DEAD_LETTERED_AT] = rfc3339(now)
    return _signed(out, message_id, past, routing_key, user_id, signer)


def _signed(out: dict[str, Any], message_id: str | None, past: History, routing_key: str, user_id: str | None,
            signer: Signer) -> dict[str, Any]:
    out[H_ATTEMPTS] = past.attempt
    out[H_ORIGINAL_ROUTING_KEY] = routing_key
    out[H_FIRST_ATTEMPT_AT] = rfc3339(past.first_attempt_at)
    if user_id:
        out[H_ORIGINAL_USER_ID] = user_id
    if message_id:
        out[H_SIGNATURE] = signer.sign(message_id, out)
    return out


def rfc3339(moment: dt.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _int(value: Any) -> int:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _str(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value if isinstance(value, str) and value else None


def _time(value: Any) -> dt.datetime | None:
    text = _str(value)
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
