"""The retry and dead-letter policy (consumers.retry): pure functions of headers, settings and time."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pytest

from consumers import retry
from contracts.topology import (
    H_ATTEMPTS,
    H_DEAD_LETTERED_AT,
    H_ERROR,
    H_ERROR_CODE,
    H_FIRST_ATTEMPT_AT,
    H_ORIGINAL_ROUTING_KEY,
    H_ORIGINAL_USER_ID,
)

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


@dataclass
class S:
    retry_delays_s: list[float] = field(default_factory=lambda: [1, 2, 5, 10, 30])
    revoke_wait_s: float = 300.0


def returned_headers(attempts: int, first: dt.datetime = NOW, key: str = "certificate.revoke") -> dict:
    return {H_ATTEMPTS: attempts, H_FIRST_ATTEMPT_AT: retry.rfc3339(first), H_ORIGINAL_ROUTING_KEY: key}


def test_retry_queue_names():
    assert retry.retry_queue("intyg.status", 5) == "intyg.status.retry.5000ms"
    assert retry.retry_queue("intyg.status", 0.25) == "intyg.status.retry.250ms"
    assert retry.retry_queues("intyg.query", S([1, 2, 2])) == {"intyg.query.retry.1000ms": 1000,
                                                               "intyg.query.retry.2000ms": 2000}


def test_came_back_only_from_the_default_exchange_with_the_queue_name():
    assert retry.came_back("", "intyg.status", "intyg.status")
    assert not retry.came_back("intyg.commands", "certificate.revoke", "intyg.status")
    assert not retry.came_back("", "intyg.registration", "intyg.status")


def test_a_fresh_message_has_no_history_even_with_retry_headers():
    """A replayed dead letter (or a forged header) must not inherit earlier attempts or another routing key."""
    past = retry.history(returned_headers(5, NOW - dt.timedelta(hours=1), "consent.set"), NOW, returned=False)
    assert past == retry.History(0, NOW, None)
    assert past.attempt == 1
    assert retry.routing_key("certificate.revoke", past) == "certificate.revoke"


def test_a_returned_copy_restores_attempts_first_attempt_and_routing_key():
    first = NOW - dt.timedelta(seconds=42)
    past = retry.history(returned_headers(2, first), NOW, returned=True)
    assert past.attempts == 2 and past.attempt == 3
    assert past.first_attempt_at == first
    assert retry.routing_key("intyg.status", past) == "certificate.revoke"


@pytest.mark.parametrize("value", [None, "x", -3, b"junk"])
def test_bad_attempt_headers_count_as_none(value):
    past = retry.history({H_ATTEMPTS: value, H_FIRST_ATTEMPT_AT: "not a time"}, NOW, returned=True)
    assert past.attempts == 0 and past.first_attempt_at == NOW and past.original_routing_key is None


def test_headers_as_bytes_are_read():
    past = retry.history({H_ATTEMPTS: b"3", H_ORIGINAL_ROUTING_KEY: b"consent.set"}, NOW, returned=True)
    assert past.attempts == 3 and past.original_routing_key == "consent.set"


def test_next_delay_is_the_list_in_order_then_its_last_entry():
    s = S()
    assert [retry.next_delay(n, s) for n in range(1, 9)] == [1, 2, 5, 10, 30, 30, 30, 30]


def test_transient_faults_use_every_delay_once_then_give_up():
    s = S()
    decisions = [retry.after_fault(retry.History(n, NOW, None), s) for n in range(0, 7)]
    assert [d.retry for d in decisions] == [True, True, True, True, True, False, False]
    assert [d.delay_s for d in decisions[:5]] == [1, 2, 5, 10, 30]
    assert decisions[5].attempt == 6 and decisions[5].delay_s is None
    assert retry.transient_exhausted(5, s) is False
    assert retry.transient_exhausted(6, s) is True
    assert decisions[2].describe == "retrying in 5s (attempt 3/6)"
    assert decisions[5].describe == "giving up after 6 attempts"


def test_no_delays_means_no_retries():
    decision = retry.after_fault(retry.History(0, NOW, None), S([]))
    assert not decision.retry and decision.attempt == 1


def test_a_revoke_waits_until_the_window_has_passed_since_its_first_attempt():
    s = S(revoke_wait_s=60)
    early = retry.History(7, NOW - dt.timedelta(seconds=59), None)
    decision = retry.after_not_yet(early, s, NOW)
    assert decision.retry and decision.delay_s == 30 and decision.attempt == 8 and decision.limit is None
    assert not retry.revoke_wait_exceeded(early, s, NOW)
    late = retry.History(7, NOW - dt.timedelta(seconds=60), None)
    assert retry.revoke_wait_exceeded(late, s, NOW)
    assert not retry.after_not_yet(late, s, NOW).retry


def test_a_revoke_is_not_limited_by_the_transient_retry_count():
    s = S(revoke_wait_s=300)
    past = retry.history(returned_headers(20, NOW - dt.timedelta(seconds=100)), NOW, returned=True)
    assert retry.after_not_yet(past, s, NOW).retry
    assert not retry.after_fault(past, s).retry


def test_retry_headers_keep_the_messages_own_and_add_bookkeeping():
    own = {"x-trace": "abc", H_ORIGINAL_USER_ID: "earlier-sender"}
    past = retry.History(1, NOW - dt.timedelta(seconds=3), None)
    headers = retry.retry_headers(own, past, "certificate.register", user_id="vardsystem",
                                  code="UNAVAILABLE", error="database unavailable")
    assert headers == {"x-trace": "abc", H_ORIGINAL_USER_ID: "earlier-sender", H_ATTEMPTS: 2,
                       H_ORIGINAL_ROUTING_KEY: "certificate.register",
                       H_FIRST_ATTEMPT_AT: "2026-11-25T11:59:57.000Z",
                       H_ERROR_CODE: "UNAVAILABLE", H_ERROR: "database unavailable"}
    assert own == {"x-trace": "abc", H_ORIGINAL_USER_ID: "earlier-sender"}  # not mutated


def test_retry_headers_carry_the_sender_when_there_is_none_yet():
    headers = retry.retry_headers(None, retry.History(0, NOW, None), "consent.set", user_id="portal",
                                  code="UNAVAILABLE", error="x")
    assert headers[H_ORIGINAL_USER_ID] == "portal"
    assert H_ORIGINAL_USER_ID not in retry.retry_headers(None, retry.History(0, NOW, None), "consent.set",
                                                         user_id=None, code="UNAVAILABLE", error="x")


def test_dead_letter_headers():
    past = retry.History(5, NOW - dt.timedelta(seconds=48), "certificate.send")
    headers = retry.dead_letter_headers({"x-trace": "abc"}, past, "certificate.send", user_id="portal",
                                        code="UNAVAILABLE", error="e" * 2000, now=NOW)
    assert headers[H_ERROR_CODE] == "UNAVAILABLE"
    assert len(headers[H_ERROR]) == retry.MAX_ERROR_LENGTH
    assert headers[H_ATTEMPTS] == 6
    assert headers[H_ORIGINAL_ROUTING_KEY] == "certificate.send"
    assert headers[H_DEAD_LETTERED_AT] == "2026-11-25T12:00:00.000Z"
    assert dt.datetime.fromisoformat(headers[H_DEAD_LETTERED_AT]) == NOW  # RFC 3339
    assert headers[H_ORIGINAL_USER_ID] == "portal"
    assert headers["x-trace"] == "abc"


def test_an_invalid_message_is_dead_lettered_after_one_attempt():
    past = retry.history({}, NOW, returned=False)
    headers = retry.dead_letter_headers({}, past, "certificate.register", user_id=None,
                                        code="INVALID_MESSAGE", error="body is not a JSON object", now=NOW)
    assert headers[H_ATTEMPTS] == 1 and headers[H_ERROR_CODE] == "INVALID_MESSAGE"
    assert H_ORIGINAL_USER_ID not in headers


def test_rfc3339_of_naive_and_offset_times():
    assert retry.rfc3339(dt.datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000Z"
    cet = dt.timezone(dt.timedelta(hours=1))
    assert retry.rfc3339(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=cet)) == "2026-01-02T02:04:05.000Z"
