"""How each end state of a message is settled (consumers.outcome): one test per transition."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import psycopg
import pytest

from consumers import retry
from consumers.batch import Item
from consumers.envelope import Delivery, Envelope
from consumers.outcome import decide
from consumers.pipeline import Invalid, Processed, RetryLater
from contracts.replies import Code, Reply

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
DLQ = "intyg.status.dlq"


@dataclass
class S:
    retry_delays_s: list[float] = field(default_factory=lambda: [1, 2])
    revoke_wait_s: float = 60.0


def item(reply_to: str | None = "amq.rabbitmq.reply-to", attempts: int = 0, first: dt.datetime = NOW) -> Item:
    envelope = Envelope("certificate.revoke", b"{}", message_id="m-1", reply_to=reply_to)
    return Item(Delivery(1, "intyg.commands", "certificate.revoke", None, b"{}"), envelope,
                retry.History(attempts, first))


def sql_error(sqlstate: str) -> psycopg.Error:
    error = psycopg.Error("boom")
    error.sqlstate = sqlstate  # type: ignore[misc]
    return error


class Transient(psycopg.OperationalError):
    """A lost connection: no SQLSTATE."""


def test_invalid_is_answered_and_dead_lettered_without_retry():
    it = item()
    it.invalid = Invalid(Code.INVALID_MESSAGE, "body is not a JSON object")
    s = decide(it, S(), NOW, DLQ)
    assert s.reply.code == Code.INVALID_MESSAGE and s.dead_letter and s.retry is None
    assert s.error == ("INVALID_MESSAGE", "body is not a JSON object")


def test_invalid_without_a_usable_reply_to_is_only_dead_lettered():
    it = item(reply_to=None)
    it.invalid = Invalid(Code.INVALID_MESSAGE, "reply_to contains NUL")
    s = decide(it, S(), NOW, DLQ)
    assert s.reply is None and s.dead_letter


def test_an_applied_message_is_answered_after_the_commit_and_nothing_more():
    it = item()
    it.processed = Processed(Reply.ok("m-1"), "OK")
    s = decide(it, S(), NOW, DLQ)
    assert s.reply == Reply.ok("m-1") and not s.dead_letter and s.retry is None and s.outcome == "OK"


def test_an_applied_message_without_reply_to_is_not_answered():
    it = item(reply_to=None)
    it.processed = Processed(Reply.ok("m-1"), "OK")
    assert decide(it, S(), NOW, DLQ).reply is None


def test_a_revoke_that_overtook_its_register_waits_then_is_dead_lettered_not_found():
    not_found = Reply.for_code(Code.NOT_FOUND, "m-1", "no such certificate")
    waiting = item(attempts=3, first=NOW - dt.timedelta(seconds=10))
    waiting.not_yet = RetryLater(not_found)
    s = decide(waiting, S(), NOW, DLQ)
    assert s.outcome == "WAITING" and s.retry.delay_s == 2 and s.reply is None and not s.dead_letter
    late = item(attempts=9, first=NOW - dt.timedelta(seconds=60))
    late.not_yet = RetryLater(not_found)
    s = decide(late, S(), NOW, DLQ)
    assert s.reply == not_found and s.dead_letter and s.error[0] == "NOT_FOUND" and s.retry is None


def test_a_transient_fault_is_retried_then_answered_unavailable_and_dead_lettered():
    first = item()
    first.fault = Transient("connection lost")
    s = decide(first, S(), NOW, DLQ)
    assert s.outcome == "RETRY" and s.retry.delay_s == 1 and s.reply is None and not s.dead_letter
    last = item(attempts=2)
    last.fault = Transient("connection lost")
    s = decide(last, S(), NOW, DLQ)
    assert s.reply.code == Code.UNAVAILABLE and s.dead_letter and s.retry is None


@pytest.mark.parametrize("sqlstate", ["22021", "22P05", "22001", "54000"])
def test_a_value_the_database_refuses_is_invalid_at_once(sqlstate):
    it = item()
    it.fault = sql_error(sqlstate)
    s = decide(it, S(), NOW, DLQ)
    assert s.reply.code == Code.INVALID_MESSAGE and s.dead_letter and s.retry is None


def test_a_bug_is_dead_lettered_unavailable_at_once_not_retried():
    it = item()
    it.fault = KeyError("a bug")
    s = decide(it, S(), NOW, DLQ)
    assert s.reply.code == Code.UNAVAILABLE and s.dead_letter and s.retry is None
    assert s.exc_info is it.fault and s.level == "error"
