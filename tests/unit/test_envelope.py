"""Reading a delivery (consumers.envelope): every property checked before use, no client header trusted (CONTRACT
§2, §8). The same rules are attacked through a running service in tests/e2e/test_e2e_hostile.py."""
from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

import pika
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers import retry
from consumers.envelope import Delivery, Reader
from consumers.pipeline import escapes_nul
from contracts.topology import H_ATTEMPTS, H_ORIGINAL_ROUTING_KEY, H_ORIGINAL_USER_ID, H_SIGNATURE

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
SIGNER = retry.Signer(b"test key")
READER = Reader("intyg.status", "intygstjanst", SIGNER)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def delivery(routing_key="certificate.revoke", exchange="intyg.commands", **properties) -> Delivery:
    properties.setdefault("message_id", "m-1")
    return Delivery(1, exchange, routing_key, pika.BasicProperties(**properties), b"{}")


def signed(message_id="m-1", user="care-a", attempts=2, routing_key="certificate.revoke") -> dict:
    return retry.retry_headers({}, message_id, retry.History(attempts - 1, NOW - dt.timedelta(seconds=5)),
                               routing_key, user_id=user, code="NOT_FOUND", error="x", signer=SIGNER)


def test_a_message_id_that_is_not_utf8_is_invalid_and_never_used_for_the_reply():
    envelope, _ = READER.read(delivery(message_id=b"\xff\xfe"), NOW)
    assert envelope.problem == "message_id is not UTF-8"
    assert envelope.message_id is None and envelope.reply_correlation_id is None


def test_nul_in_message_id_reply_to_or_correlation_id_is_invalid():
    for name in ("message_id", "reply_to", "correlation_id"):
        envelope, _ = READER.read(delivery(**{name: "a\x00b"}), NOW)
        assert envelope.problem == f"{name} contains NUL"
        assert getattr(envelope, name) is None


def test_a_message_id_longer_than_128_is_invalid():
    envelope, _ = READER.read(delivery(message_id="m" * 129), NOW)
    assert envelope.problem == "message_id is longer than 128 characters"


def test_a_reply_to_naming_a_recipient_or_service_queue_is_refused():
    for queue in ("recipient.FKASSA", "intyg.status", "intyg.status.dlq"):
        envelope, _ = READER.read(delivery(reply_to=queue), NOW)
        assert envelope.reply_to is None and envelope.problem
    envelope, _ = READER.read(delivery(reply_to="amq.gen-JzTY20BRgKO-HjmUJj0wLg"), NOW)
    assert envelope.reply_to == "amq.gen-JzTY20BRgKO-HjmUJj0wLg" and envelope.problem is None


def test_cc_bcc_and_unknown_headers_are_never_kept():
    headers = {"CC": ["recipient.FKASSA"], "BCC": ["intyg.status"], "x-custom": "y", "traceparent": TRACEPARENT}
    envelope, _ = READER.read(delivery(headers=headers), NOW)
    assert envelope.trace == {"traceparent": TRACEPARENT}
    assert envelope.problem is None


def test_a_trace_header_that_is_not_printable_ascii_is_dropped():
    envelope, _ = READER.read(delivery(headers={"traceparent": "00-\x00", "tracestate": b"\xff" * 3}), NOW)
    assert envelope.trace == {}


def test_a_client_x_intyg_header_is_never_read():
    envelope, past = READER.read(delivery(headers={H_ORIGINAL_USER_ID: "ops"}, user_id="care-a"), NOW)
    assert envelope.problem is None and envelope.trace == {}
    assert envelope.origin_user is None and envelope.user_id == "care-a" and past.attempts == 0


def test_forged_attempts_never_count():
    envelope, past = READER.read(delivery(headers={H_ATTEMPTS: 99, H_ORIGINAL_ROUTING_KEY: "consent.set"}), NOW)
    assert past.attempts == 0 and envelope.routing_key == "certificate.revoke" and envelope.problem is None


def test_our_signed_retry_copy_acts_as_its_original_sender_under_its_original_routing_key():
    copy = delivery("intyg.status", "", user_id="intygstjanst", headers=signed())
    envelope, past = READER.read(copy, NOW)
    assert envelope.problem is None
    assert (envelope.routing_key, envelope.user_id, past.attempts) == ("certificate.revoke", "care-a", 2)


def test_a_retry_copy_with_a_forged_sender_is_invalid():
    headers = {**signed(), H_ORIGINAL_USER_ID: "ops"}
    envelope, past = READER.read(delivery("intyg.status", "", user_id="intygstjanst", headers=headers), NOW)
    assert envelope.problem == "retry bookkeeping was not written by this service"
    assert envelope.user_id == "intygstjanst" and past.attempts == 0


def test_a_signed_copy_published_by_a_client_is_not_our_retry_copy():
    """A client that copies our signed headers into a message published into the delay queue does not get the
    copy's sender: its own broker user publishes it, so it is not a returned copy."""
    envelope, past = READER.read(delivery("intyg.status", "", user_id="care-b", headers=signed()), NOW)
    assert envelope.user_id == "care-b" and past.attempts == 0
    assert envelope.origin_user == "care-a"  # would count only if care-b were an operator (pipeline.authorize)


def test_a_signed_dead_letter_names_its_sender_for_an_operator_replay():
    headers = retry.dead_letter_headers({}, "m-1", retry.History(0, NOW), "certificate.revoke", user_id="care-a",
                                        code="UNAVAILABLE", error="x", now=NOW, signer=SIGNER)
    envelope, _ = READER.read(delivery(user_id="ops", headers=headers), NOW)
    assert envelope.problem is None and envelope.origin_user == "care-a" and envelope.user_id == "ops"


def test_the_signature_of_another_message_does_not_transfer():
    envelope, _ = READER.read(delivery(message_id="m-2", user_id="ops", headers=signed("m-1")), NOW)
    assert envelope.origin_user is None and envelope.user_id == "ops"


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True),
                     st.text(max_size=300), st.binary(max_size=300),
                     st.decimals(allow_nan=False, allow_infinity=False, places=2, max_value=10**6, min_value=-10**6),
                     st.datetimes(timezones=st.just(dt.UTC)))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=20), inner, max_size=4)),
                       max_leaves=12)
_names = st.one_of(st.sampled_from(["CC", "BCC", "traceparent", "tracestate", H_ATTEMPTS, H_ORIGINAL_USER_ID,
                                    H_ORIGINAL_ROUTING_KEY, H_SIGNATURE, "x-intyg-first-attempt-at"]),
                   st.text(max_size=30))
_texts = st.one_of(st.none(), st.text(max_size=300), st.binary(max_size=300), st.integers(), st.floats())


@settings(max_examples=300, deadline=None)
@given(headers=st.one_of(st.none(), st.dictionaries(_names, _values, max_size=8)), message_id=_texts,
       reply_to=_texts, correlation_id=_texts, kind=_texts, content_type=_texts,
       user_id=st.one_of(st.none(), st.sampled_from(["intygstjanst", "care-a", "ops"])),
       returned=st.booleans())
def test_any_properties_and_headers_read_safely(headers, message_id, reply_to, correlation_id, kind, content_type,
                                                user_id, returned):
    properties = SimpleNamespace(message_id=message_id, reply_to=reply_to, correlation_id=correlation_id, type=kind,
                                 content_type=content_type, user_id=user_id, headers=headers)
    exchange, key = ("", "intyg.status") if returned else ("intyg.commands", "certificate.revoke")
    envelope, past = READER.read(Delivery(1, exchange, key, properties, b"{}"), NOW)
    for name in ("message_id", "reply_to", "correlation_id", "type", "content_type"):
        value = getattr(envelope, name)
        assert value is None or (isinstance(value, str) and "\x00" not in value and len(value) <= 255)
    assert set(envelope.trace) <= {"traceparent", "tracestate"}
    assert all(isinstance(v, str) and v.isascii() for v in envelope.trace.values())
    assert past.attempts == 0  # nothing unsigned ever counts
    assert envelope.origin_user is None  # nothing unsigned ever names a sender
    if envelope.problem is None:
        assert envelope.message_id is not None
    assert past.first_attempt_at == NOW


def test_a_clients_value_echoed_in_a_reply_is_short_and_never_a_personnummer():
    from consumers.pipeline import quoted

    assert quoted("certificate.191212121212") == repr("certificate.<personnummer>")
    assert len(quoted("x" * 300)) < 70


@given(text=st.text(alphabet=st.sampled_from(["\x00", "\\", "u", "0", "a", '"', "é"]), max_size=40),
       ascii_only=st.booleans())
def test_a_nul_is_found_exactly_when_the_text_holds_one(text, ascii_only):
    """`\\u0000` in the JSON is a NUL only when its backslash is not itself escaped: a document may hold the six
    characters `\\u0000` (written `\\\\u0000`) and must not be refused for them."""
    body = json.dumps({"certificate": {"document": {"content": text}}}, ensure_ascii=ascii_only).encode()
    assert escapes_nul(body) == ("\x00" in text)
