"""One batch of deliveries in one database transaction: the commit is the only moment of truth.

Every message of the batch ends in exactly one of these states (`Item`), from which `consumers.outcome` decides
how it is settled:
- `invalid`: refused before the database was touched (bad properties, body, shape);
- `processed`: applied and committed (or answered from the inbox, or refused by a business rule);
- `not_yet`: a revoke that overtook its register (retried within a window);
- `fault`: applying it failed; `consumers.outcome` tells a transient fault from one that fails every time.

How a batch is applied (`apply`), in at most a few transactions:
1. optimistically: all messages in one transaction without savepoints (two round trips less per message), after
   one warm-up query for the whole batch (`SqlUnitOfWork.warm`);
2. if anything but a transient fault happens (a refused value, a bug, a buffered insert that failed where it is
   not known whose it was, a warm-up that failed): roll back and run the batch again with a savepoint per
   message, so that the failing message is undone alone and the others commit;
3. a transient fault (deadlock, lost connection) takes the whole transaction with it: that message goes to the
   retry path and the others run again in a fresh transaction (at most `MAX_ROUNDS`), so one bad message never
   drags the messages beside it into the retry queues or the DLQ.
"""
from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consumers import pipeline
from consumers.envelope import Delivery, Envelope
from consumers.pipeline import Invalid, Parsed, Processed, RetryLater
from consumers.retry import History
from storage.errors import is_transient

MAX_ROUNDS = 3  # transactions per batch lost to transient faults before the rest goes to the retry path


@dataclass
class Item:
    delivery: Delivery
    envelope: Envelope
    past: History
    parsed: Parsed | None = None
    invalid: Invalid | None = None
    processed: Processed | None = None
    not_yet: RetryLater | None = None
    fault: BaseException | None = None
    ms: float = 0.0
    committed: bool = False  # its effects are committed (so it must not run again in this delivery)
    span: Any = None  # the span of its handling, when tracing is on (`consumers.tracing`)
    trace: Mapping[str, str] | None = None  # the span's trace context: what its replies and events carry

    @property
    def outgoing_trace(self) -> Mapping[str, str]:
        """The trace context of what the message produces: its span's, else the one it came with."""
        return self.envelope.trace if self.trace is None else self.trace

    @property
    def message_id(self) -> str | None:
        return self.envelope.message_id

    def reset(self) -> None:
        self.processed = self.not_yet = self.fault = None

    def parse(self, policy: pipeline.Policy) -> None:
        started = time.perf_counter()
        try:
            self.parsed = pipeline.parse(self.envelope, policy, self.outgoing_trace)
        except Invalid as invalid:
            self.invalid = invalid
        except Exception as exc:  # noqa: BLE001 - a bug in parsing: settled like any fault of this message
            self.fault = exc
        self.ms += (time.perf_counter() - started) * 1000


class _FallBack(Exception):
    """Roll back and run the batch again with a savepoint per message."""


class _Culprit(Exception):
    def __init__(self, item: Item) -> None:
        self.item = item


def apply(items: Sequence[Item], new_uow: Callable[[], Any], policy: pipeline.Policy, now: dt.datetime,
          retried: Callable[[str], None] = lambda reason: None) -> None:
    """Apply every parsed message of `items` and commit; see the module docstring. `retried` hears of each
    transaction run again: "fallback" (a savepoint per message) or "transient" (a fault took the transaction)."""
    pending = [i for i in items if i.parsed is not None and i.fault is None]
    careful = False
    rounds = 0
    while pending:
        for item in pending:
            item.reset()
        try:
            _transaction(pending, new_uow, policy, now, careful=careful)
        except _FallBack:
            if careful:  # cannot happen: careful runs never fall back
                raise
            careful = True
            retried("fallback")
            continue
        except _Culprit as culprit:
            rounds += 1
            retried("transient")
            pending = [i for i in pending if i is not culprit.item]
            if rounds >= MAX_ROUNDS:  # too many transient faults in a row: the retry path sorts them out
                for item in pending:
                    item.reset()
                    item.fault = culprit.item.fault
                return
            continue
        except Exception as exc:  # noqa: BLE001 - begin, warm-up, flush or commit failed
            if not careful and not is_transient(exc):
                careful = True  # maybe one message's value: find it with a savepoint per message
                retried("fallback")
                continue
            for item in pending:
                item.reset()
                item.fault = exc
            return
        for item in pending:
            item.committed = item.processed is not None
        return


def _transaction(pending: Sequence[Item], new_uow: Callable[[], Any], policy: pipeline.Policy, now: dt.datetime,
                 *, careful: bool) -> None:
    with new_uow() as uow:
        if not careful:
            _warm(uow, pending)
        for item in pending:
            started = time.perf_counter()
            try:
                if careful:
                    with uow.savepoint():
                        item.processed = pipeline.process(item.parsed, uow, policy, now)
                else:
                    item.processed = pipeline.process(item.parsed, uow, policy, now)
            except RetryLater as not_yet:
                if not careful:
                    raise _FallBack from None  # it may have written before it found out: undo it alone
                item.not_yet = not_yet
            except Invalid as invalid:  # found invalid only once applied (a tampered page token)
                if not careful:
                    raise _FallBack from None
                item.invalid = invalid
            except Exception as exc:  # noqa: BLE001
                if not careful and uow.flush_failed:
                    # Queued inserts of earlier messages failed when this one's statement flushed them: a
                    # savepoint per message (each flushed at its end) tells whose they were.
                    raise _FallBack from None
                if is_transient(exc):
                    item.fault = exc
                    raise _Culprit(item) from None
                if not careful:
                    raise _FallBack from None
                item.fault = exc  # its savepoint is rolled back; the rest of the batch goes on
            finally:
                item.ms += (time.perf_counter() - started) * 1000
        if not careful:
            try:
                uow.flush()  # the batch's queued inserts; whose failed is not known here
            except Exception:  # noqa: BLE001
                raise _FallBack from None
        uow.commit()


def _warm(uow: Any, pending: Sequence[Item]) -> None:
    """One query tells which of the batch's commands are new and which certificates do not exist yet, so that
    registering a batch of new certificates reads nothing more (see `SqlUnitOfWork.warm`)."""
    commands = [i.parsed for i in pending if i.parsed is not None and not i.parsed.route.query]
    if commands:
        uow.warm([p.message_id for p in commands], [pipeline.subject(p) for p in commands])


def continue_bulk(item: Item, new_uow: Callable[[], Any], policy: pipeline.Policy, clock: Callable[[], dt.datetime],
                  between: Callable[[], None], committed: Callable[[Sequence[Item]], None]) -> None:
    """A care giver leaving: commit and go on, one bounded batch per transaction, until done. `between` runs before
    each transaction (the loop answers broker heartbeats there), `committed` after each commit."""
    while item.processed is not None and item.processed.more:
        between()
        started = time.perf_counter()
        try:
            with new_uow() as uow:
                item.processed = pipeline.process(item.parsed, uow, policy, clock())
                uow.commit()
        except Exception as exc:  # noqa: BLE001 - work so far is committed; a retry resumes it
            item.processed, item.fault = None, exc
            return
        finally:
            item.ms += (time.perf_counter() - started) * 1000
        committed([item])
