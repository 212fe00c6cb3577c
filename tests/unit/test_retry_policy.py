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
    H_SIGNATURE,
)

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
SIGNER = retry.Signer(b"test key")


@dataclass
class S:
    retry_delays_s: list[float] = field(default_factory=lambda: [1, 2, 5, 10, 30])
    revoke_wait_s: float = 300.0


def test_retry_queue_names():
    assert retry.retry_queue("intyg.status", 5) == "intyg.status.retry.5000ms"
    assert retry.retry_queue("intyg.status", 0.25) == "intyg.status.retry.250ms"
    assert retry.retry_queues("intyg.query", S([1, 2, 2])) == {"intyg.query.retry.1000ms": 1000,
                                                               "intyg.query.retry.2000ms": 2000}


def test_came_back_only_from_the_default_exchange_with_the_queue_name():
    assert retry.came_back("", "intyg.status", "intyg.status")
    assert not retry.came_back("intyg.commands", "certificate.revoke", "intyg.status")
    assert not retry.came_back("", "intyg.registration", "intyg.status")


def test_next_delay_is_the_list_in_order_then_its_last_entry():
    s = S()
    assert [retry.next_delay(n, s) for n in range(1, 9)] == [1, 2, 5, 10, 30, 30, 30, 30]


def test_transient_faults_use_every_delay_once_then_give_up():
    s = S()
    decisions = [retry.after_fault(retry.History(n, NOW), s) for n in range(0, 7)]
    assert [d.retry for d in decisions] == [True, True, True, True, True, False, False]
    assert [d.delay_s for d in decisions[:5]] == [1, 2, 5, 10, 30]
    assert decisions[5].attempt == 6 and decisions[5].delay_s is None
    assert retry.transient_exhausted(5, s) is False
    assert retry.transient_exhausted(6, s) is True
    assert decisions[2].describe == "retrying in 5s (attempt 3/6)"
    assert decisions[5].describe == "giving up after 6 attempts"


def test_no_delays_means_no_retries():
    decision = retry.after_fault(retry.History(0, NOW), S([]))
    assert not decision.retry and decision.attempt == 1


def test_a_revoke_waits_until_the_window_has_passed_since_its_first_attempt():
    s = S(revoke_wait_s=60)
    early = retry.History(7, NOW - dt.timedelta(seconds=59))
    decision = retry.after_not_yet(early, s, NOW)
    assert decision.retry and decision.delay_s == 30 and decision.attempt == 8 and decision.limit is None
    assert not retry.revoke_wait_exceeded(early, s, NOW)
    late = retry.History(7, NOW - dt.timedelta(seconds=60))
    assert retry.revoke_wait_exceeded(late, s, NOW)
    assert not retry.after_not_yet(late, s, NOW).retry


def test_a_revoke_is_not_limited_by_the_transient_retry_count():
    s = S(revoke_wait_s=300)
    past = retry.History(20, NOW - dt.timedelta(seconds=100))
    assert retry.after_not_yet(past, s, NOW).retry
    assert not retry.after_fault(past, s).retry


def test_retry_headers_keep_only_allow_listed_client_headers_and_sign_the_bookkeeping():
    kept = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    past = retry.History(1, NOW - dt.timedelta(seconds=3))
    headers = retry.retry_headers(kept, "m-1", past, "certificate.register", user_id="vardsystem",
                                  code="UNAVAILABLE", error="database unavailable", signer=SIGNER)
    signature = headers.pop(H_SIGNATURE)
    assert headers == {**kept, H_ATTEMPTS: 2, H_ORIGINAL_ROUTING_KEY: "certificate.register",
                       H_ORIGINAL_USER_ID: "vardsystem", H_FIRST_ATTEMPT_AT: "2026-11-25T11:59:57.000Z",
                       H_ERROR_CODE: "UNAVAILABLE", H_ERROR: "database unavailable"}
    assert signature == SIGNER.sign("m-1", headers)


def test_no_sender_no_sender_header():
    headers = retry.retry_headers({}, "m-1", retry.History(0, NOW), "consent.set", user_id=None,
                                  code="UNAVAILABLE", error="x", signer=SIGNER)
    assert H_ORIGINAL_USER_ID not in headers


def test_dead_letter_headers():
    past = retry.History(5, NOW - dt.timedelta(seconds=48))
    headers = retry.dead_letter_headers({}, "m-1", past, "certificate.send", user_id="portal",
                                        code="UNAVAILABLE", error="e" * 2000, now=NOW, signer=SIGNER)
    assert headers[H_ERROR_CODE] == "UNAVAILABLE"
    assert len(headers[H_ERROR]) == retry.MAX_ERROR_LENGTH
    assert headers[H_ATTEMPTS] == 6
    assert headers[H_ORIGINAL_ROUTING_KEY] == "certificate.send"
    assert headers[H_DEAD_LETTERED_AT] == "2026-11-25T12:00:00.000Z"
    assert dt.datetime.fromisoformat(headers[H_DEAD_LETTERED_AT]) == NOW  # RFC 3339
    assert headers[H_ORIGINAL_USER_ID] == "portal"
    assert SIGNER.verified(headers, "m-1") == retry.Bookkeeping("certificate.send", "portal", 6, past.first_attempt_at)


def test_the_signature_binds_the_bookkeeping_to_its_message():
    headers = retry.dead_letter_headers({}, "m-1", retry.History(0, NOW), "certificate.revoke", user_id="care-a",
                                        code="NOT_FOUND", error="x", now=NOW, signer=SIGNER)
    assert SIGNER.verified(headers, "m-1") is not None
    assert SIGNER.verified(headers, "m-2") is None  # copied onto another message
    assert SIGNER.verified({**headers, H_ORIGINAL_USER_ID: "ops"}, "m-1") is None  # another sender
    assert SIGNER.verified({**headers, H_ATTEMPTS: 0}, "m-1") is None
    assert SIGNER.verified({**headers, H_ORIGINAL_ROUTING_KEY: "consent.set"}, "m-1") is None
    assert retry.Signer(b"another deployment").verified(headers, "m-1") is None
    assert SIGNER.verified({k: v for k, v in headers.items() if k != H_SIGNATURE}, "m-1") is None


def test_rfc3339_of_naive_and_offset_times():
    assert retry.rfc3339(dt.datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000Z"
    cet = dt.timezone(dt.timedelta(hours=1))
    assert retry.rfc3339(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=cet)) == "2026-01-02T02:04:05.000Z"
