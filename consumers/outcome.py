"""How a message of a batch is settled, decided from its end state (`consumers.batch.Item`): pure, no pika.

The transitions, each named by a test in tests/unit/test_outcome.py:
- invalid                    -> error reply (when reply_to is usable) + dead letter with its code, no retry;
- applied                    -> the reply (its events are committed to the outbox);
- not yet (revoke overtook)  -> retry copy while the revoke window lasts, then NOT_FOUND reply + dead letter;
- transient fault            -> retry copy while `retry_delays_s` lasts, then UNAVAILABLE reply + dead letter;
- refused value (class 22/54)-> INVALID_MESSAGE reply + dead letter at once: the database refuses it every time;
- any other fault (a bug)    -> UNAVAILABLE reply + dead letter at once: it would fail the same way every time,
                                and a replay after the fix applies it.
The loop acknowledges a delivery once its settlement is published (confirmed); if publishing it fails for a
reason of this message alone, the delivery is rejected and the broker dead-letters it (`service.topology`).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from sqlalchemy import exc as sa_exc

from consumers import retry
from consumers.batch import Item
from consumers.pipeline import error_reply
from contracts.replies import Code, Reply
from domain.privacy import scrub
from storage.errors import RacedWithPurge, is_refused_value, is_transient


@dataclass(frozen=True)
class Settlement:
    outcome: str  # what the log line says: OK, a reply code, RETRY, WAITING, DUPLICATE, ...
    event: str  # the log line's text
    reply: Reply | None = None  # to reply_to, after the commit (the batch's replies in one AMQP transaction)
    retry: retry.Decision | None = None  # a retry copy to the delay queue of `retry.delay_s`
    dead_letter: bool = False  # a copy to the DLQ
    error: tuple[str, str] | None = None  # (code, reason) for the headers of the retry copy or dead letter
    level: str = "info"
    log: dict[str, Any] = field(default_factory=dict)
    exc_info: BaseException | None = None


def decide(item: Item, settings: retry.RetrySettings, now: dt.datetime, dlq: str) -> Settlement:
    envelope = item.envelope
    answer = envelope.reply_to is not None
    if item.invalid is not None:
        code, reason = item.invalid.code.value, item.invalid.message
        return Settlement(code, f"invalid message, dead-lettered to {dlq}: {code}: {reason}",
                          reply=error_reply(envelope, item.invalid.code, reason) if answer else None,
                          dead_letter=True, error=(code, reason), level="warning")
    if item.not_yet is not None:
        decision = retry.after_not_yet(item.past, settings, now)
        reply = item.not_yet.reply
        code = reply.code.value if reply.code else Code.NOT_FOUND.value
        if decision.retry:
            return Settlement("WAITING", f"not there yet; {decision.describe}: {reply.message}", retry=decision,
                              error=(code, reply.message), log={"attempt": decision.attempt, "delay_s": decision.delay_s})
        waited = settings.revoke_wait_s
        return Settlement(code, f"dead-lettered to {dlq}: {code} after waiting {waited:g}s "
                                f"({decision.attempt} attempts)",
                          reply=reply if answer else None,
                          dead_letter=True, error=(code, f"still not found after {waited:g}s: {reply.message}"),
                          level="warning", log={"attempt": decision.attempt})
    if item.fault is not None:
        return _fault(item, settings, dlq)
    processed = item.processed
    assert processed is not None, "an item is settled only once it has an end state"
    reply = processed.reply if answer else None
    return Settlement(processed.outcome, "handled", reply=reply)


def _fault(item: Item, settings: retry.RetrySettings, dlq: str) -> Settlement:
    exc = item.fault
    assert exc is not None
    envelope = item.envelope
    answer = envelope.reply_to is not None
    reason = describe_fault(exc)
    if is_transient(exc):
        decision = retry.after_fault(item.past, settings)
        if decision.retry:
            return Settlement("RETRY", f"{decision.describe}: {reason}", retry=decision,
                              error=(Code.UNAVAILABLE.value, reason), level="warning",
                              log={"attempt": decision.attempt, "delay_s": decision.delay_s})
        return _unavailable(envelope, answer, reason, f"after {decision.attempt} attempts", dlq, decision.attempt)
    if is_refused_value(exc):
        text = f"a value of the message cannot be stored: {reason}"
        return Settlement(Code.INVALID_MESSAGE.value, f"invalid message, dead-lettered to {dlq}: {text}",
                          reply=error_reply(envelope, Code.INVALID_MESSAGE, text) if answer else None,
                          dead_letter=True, error=(Code.INVALID_MESSAGE.value, text), level="warning")
    settled = _unavailable(envelope, answer, reason, "at once (not transient: it would fail the same way again)",
                           dlq, item.past.attempt)
    return replace(settled, exc_info=exc)


def _unavailable(envelope: Any, answer: bool, reason: str, when: str, dlq: str, attempt: int) -> Settlement:
    reply = Reply.for_code(Code.UNAVAILABLE, envelope.message_id or "",
                           "the service could not handle the message now; try again later") if answer else None
    return Settlement(Code.UNAVAILABLE.value, f"dead-lettered to {dlq}: UNAVAILABLE {when}: {reason}", reply=reply,
                      dead_letter=True, error=(Code.UNAVAILABLE.value, reason), level="error",
                      log={"attempt": attempt})


def describe_fault(exc: BaseException) -> str:
    """A short text for logs and `x-intyg-error`: what went wrong, never the data (no personnummer, no SQL
    parameters)."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, RacedWithPurge):
            return str(current)
        if isinstance(current, psycopg.Error):
            state = current.sqlstate
            if state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03"):
                return "database unavailable"
            if state in ("40001", "40P01"):
                return "database deadlock or serialization failure"
            if state == "55P03":
                return "database lock timeout"
            if state == "57014":
                return "database statement timeout"
            if state == "23505":
                return "raced with another delivery (unique key)"
            primary = getattr(current.diag, "message_primary", None) or type(current).__name__
            return f"database error {state}: {scrub(primary)}"
        if isinstance(current, (sa_exc.TimeoutError, sa_exc.DisconnectionError)):
            return "database unavailable"
        if isinstance(current, sa_exc.DBAPIError) and current.orig is not None:
            current = current.orig
            continue
        if isinstance(current, sa_exc.DBAPIError):
            return "database unavailable" if current.connection_invalidated else f"database error ({type(current).__name__})"
        break
    text = scrub(str(exc)).splitlines()[0][:200] if str(exc) else ""
    return f"unexpected {type(exc).__name__}" + (f": {text}" if text else "")
