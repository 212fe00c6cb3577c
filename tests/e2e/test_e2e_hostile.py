"""A hostile broker client against ONE running service (CONTRACT v1.1 §1, §2, §8; issue 6).

Every broker user who may publish to `intyg.commands` is treated as hostile. Each test publishes, in one batch, a
valid `certificate.register`, a hostile message (the known attacks one test each, then random AMQP properties,
headers and bodies from a hypothesis property test) and another valid `certificate.register`, and asserts what the
service owes everyone else:

- both valid messages are answered OK in bounded time (one bad message affects only itself);
- nothing arrives in any `recipient.*` queue (nothing is sent to a recipient here: anything there is injected);
- no consumer restarted (no "consumer failed" / "reconnecting" line in the service's log, and the broker still
  counts one consumer on every service queue);
- an invalid hostile message ends in its queue's DLQ, alone, with `x-intyg-error-code`, without `CC`/`BCC` and
  without any `x-intyg-*` value the client sent.

What a client can put on the wire, and so what is generated: a `message_id` (any AMQP shortstr) is at most 255
bytes, so "huge" ids stop there; pika sends a `bytes` property as it is (non-UTF-8 included) and hands such a
property to the service as `bytes`; pika refuses to encode floats in headers, so `harness.amqp_doubles` writes
them as AMQP doubles, but only finite ones: RabbitMQ closes the connection of a client that sends a NaN or an
infinite double (541 INTERNAL_ERROR, seen on 3.10), so those never reach the service; `user_id` is absent or the
client's own user, because RabbitMQ refuses any other (406, channel closed) before the service sees it; and
`reply_to = amq.rabbitmq.reply-to` from a client that does not consume it is refused the same way. A publish the
broker refuses anyway is not an example (`reject`). The whole header frame must fit in the negotiated frame size
(128 KiB), so one "huge" header is at most 100,000 characters. A `reply_to` naming a service queue or a DLQ is
not generated: where the service should put a reply the client asked for there is not settled by the contract.
"""
from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st

try:
    from tests.e2e.common import broker_users_for, certificate, check_dead_letter, check_reply
    from tests.e2e.harness import Msg, ServiceProcess, Wire, amqp_doubles, new_id, new_patient
except ImportError:  # tests/ itself on sys.path
    from e2e.common import broker_users_for, certificate, check_dead_letter, check_reply
    from e2e.harness import Msg, ServiceProcess, Wire, amqp_doubles, new_id, new_patient

from contracts.topology import COMMANDS_EXCHANGE, SERVICE_QUEUES, dlq, recipient_queue

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPIENT_QUEUES = [recipient_queue(r) for r in ("FKASSA", "TRANSP", "AF", "SKV", "SOS")]  # the defaults (§4)
SETTINGS = {
    "BATCH_WAIT_MS": 50,  # the three messages of an example share one batch
    "MAX_BODY_BYTES": 65536,  # an oversized body without moving megabytes
}
REPLY_WITHIN_S = 15
QUEUE_OF = {rk: q for q, rks in SERVICE_QUEUES.items() for rk in rks}

# Values the service itself never writes, so that finding one on a dead letter means the client's was copied.
FORGED: dict[str, list[Any]] = {
    "x-intyg-attempts": [99, -1, "99", b"99"],
    "x-intyg-original-routing-key": ["certificate.revoke", "care-giver.remove-care-copies"],
    "x-intyg-original-user-id": ["forged-operator", b"forged-operator"],
    "x-intyg-first-attempt-at": ["2000-01-01T00:00:00Z", "not a time"],
    "x-intyg-dead-lettered-at": ["2000-01-01T00:00:00Z"],
    "x-intyg-error-code": ["OK", "FORGED"],
    "x-intyg-error": ["forged"],
}
CC_TARGETS = ["recipient.FKASSA", "recipient.SOS", "intyg.registration", "intyg.status", "intyg.registration.dlq"]


# --------------------------------------------------------------------------------------------------------------
# the hostile message and what the contract says about it
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    routing_key: str = "certificate.register"
    body_kind: str = "register"  # register | broken | shape | oversized
    body: bytes | None = None  # None: a fresh valid register body
    message_id: Any = "fresh"  # "fresh": a new unique id; None: absent
    reply_to: Any = "ours"  # "ours": the client's reply queue; None: absent
    correlation_id: Any = None
    type: Any = None
    content_type: Any = "application/json"
    own_user_id: bool = False
    headers: dict[str, Any] = field(default_factory=dict)

    def verdict(self) -> bool | None:
        """True: the contract makes it INVALID_MESSAGE (dead-lettered); False: it is handled like any valid
        message (no dead letter); None: the contract does not decide (say, a reply_to naming another queue)."""
        mid = self.message_id
        if mid is None or not _clean_text(mid) or not 1 <= len(mid) <= 128:
            return True
        if self.reply_to not in (None, "ours") and not _clean_text(self.reply_to):
            return True
        if self.correlation_id is not None and not _clean_text(self.correlation_id):
            return True
        if self.type is not None and self.type != self.routing_key:
            return True
        if self.content_type not in (None, "application/json"):
            return True
        if self.routing_key != "certificate.register" or self.body_kind != "register":
            return True
        if QUEUE_OF[self.routing_key] == "intyg.query" and self.reply_to is None:
            return True
        if self.reply_to not in (None, "ours"):
            return None
        return False

    def forged(self) -> dict[str, Any]:
        return {k: v for k, v in self.headers.items() if isinstance(k, str) and k.startswith("x-intyg-")}


def _clean_text(value: Any) -> bool:
    """UTF-8 and no NUL (CONTRACT §2 for message_id, correlation_id, reply_to)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return False
    return isinstance(value, str) and "\x00" not in value


NON_UTF8 = st.binary(min_size=1, max_size=24).filter(lambda b: not _clean_text(b))
WITH_NUL = st.text(max_size=12).map(lambda t: f"id-{t}\x00{t}")
TOO_LONG = st.integers(129, 255).map(lambda n: "m" * n)
MULTIBYTE = st.integers(1, 60).map(lambda n: "å" * n + f"-{uuid.uuid4()}")  # < 129 characters, > 128 bytes
ODD_TEXT = st.one_of(NON_UTF8, WITH_NUL, st.just(""), TOO_LONG, st.text(min_size=1, max_size=30))

MESSAGE_IDS = st.one_of(st.just("fresh"), st.none(), st.just(""), NON_UTF8, WITH_NUL, TOO_LONG,
                        st.just("m" * 255), MULTIBYTE)
REPLY_TOS = st.one_of(st.just("ours"), st.none(), NON_UTF8, WITH_NUL, st.sampled_from(
    ["recipient.FKASSA", "no-such-queue", "amq.rabbitmq.reply-to.forged"]))
CORRELATION_IDS = st.one_of(st.none(), ODD_TEXT)
TYPES = st.one_of(st.none(), st.sampled_from(["certificate.register", "certificate.revoke"]), ODD_TEXT)
CONTENT_TYPES = st.one_of(st.just("application/json"), st.none(), st.sampled_from(["text/plain", "application/xml"]),
                          NON_UTF8, WITH_NUL)

LEAVES = st.one_of(
    st.binary(max_size=24), st.text(max_size=24), WITH_NUL, NON_UTF8,
    st.floats(allow_nan=False, allow_infinity=False),
    st.decimals(min_value=-10**5, max_value=10**5, places=3, allow_nan=False, allow_infinity=False),
    st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2100, 1, 1)),
    st.integers(-2**63, 2**63 - 1), st.booleans(), st.none())
HEADER_VALUES = st.recursive(LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
CC_VALUES = st.one_of(st.lists(st.sampled_from(CC_TARGETS), min_size=1, max_size=3),
                      st.lists(st.sampled_from(CC_TARGETS).map(str.encode), min_size=1, max_size=2),
                      st.sampled_from(CC_TARGETS))
HEADERS = st.fixed_dictionaries({}, optional={
    "CC": CC_VALUES, "BCC": CC_VALUES,
    **{name: st.sampled_from(values) for name, values in FORGED.items()},
    "x-trace": HEADER_VALUES, "x-nested": HEADER_VALUES, "x-huge": st.integers(10_000, 100_000).map(lambda n: "h" * n),
}).flatmap(lambda fixed: st.dictionaries(st.text(max_size=10), HEADER_VALUES, max_size=3).map(
    lambda extra: {**extra, **fixed}))

BROKEN_BODIES = st.one_of(st.sampled_from([b"{", b"", b"\xff\xfe{}", b"null", b'{"certificate": ']),
                          st.binary(max_size=40))
SHAPE_BODIES = st.sampled_from([b"[]", b"42", b'"certificate"', b"{}", b'{"certificate": {}}',
                                b'{"certificate": null, "extra": 1}', b'{"patient_id": "191212121212"}',
                                b'{"certificate": {"id": "x\\u0000"}}'])


@st.composite
def hostile_messages(draw: st.DrawFn) -> Hostile:
    body_kind = draw(st.sampled_from(["register", "register", "broken", "shape", "oversized"]))
    body = {"register": None, "broken": None, "shape": None,
            "oversized": json.dumps({"certificate": "x" * (SETTINGS["MAX_BODY_BYTES"] + 10)}).encode()}[body_kind]
    if body_kind == "broken":
        body = draw(BROKEN_BODIES)
    elif body_kind == "shape":
        body = draw(SHAPE_BODIES)
    return Hostile(
        routing_key=draw(st.sampled_from(["certificate.register"] * 4 + ["consent.set", "certificate.get"])),
        body_kind=body_kind, body=body, message_id=draw(MESSAGE_IDS), reply_to=draw(REPLY_TOS),
        correlation_id=draw(CORRELATION_IDS), type=draw(TYPES), content_type=draw(CONTENT_TYPES),
        own_user_id=draw(st.booleans()), headers=draw(HEADERS))


# --------------------------------------------------------------------------------------------------------------
# the running service, the hostile client and an observer
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    service: ServiceProcess
    attacker: Wire  # a broker user of its own, with full rights on the vhost (the broker checks its user_id)
    attacker_user: str
    attacker_url: str
    observer: Wire  # the legitimate care system, and the operator looking at queues
    observer_url: str
    dirty: bool = False  # the last test failed: it may have left poison behind
    consumers: dict[str, int] = field(default_factory=dict)  # per service queue, once the service was up


def _launched(target: Target, service: ServiceProcess) -> None:
    target.service = service
    target.consumers = {queue: target.observer.consumers(queue) for queue in SERVICE_QUEUES}
    assert all(target.consumers.values()), f"a service queue without a consumer: {target.consumers}"


@pytest.fixture(scope="module")
def target(module_stack, module_launch, broker_users) -> Iterator[Target]:
    users, urls = broker_users_for(broker_users, module_stack, "hostile", ("attacker",))
    service = module_launch(**SETTINGS)
    state = Target(service, _client(urls["attacker"]), users["attacker"], urls["attacker"],
                   _client(module_stack.amqp_url), module_stack.amqp_url)
    _launched(state, service)
    yield state
    state.attacker.close()
    state.observer.close()


def _client(url: str) -> Wire:
    return Wire(url, tap_events=False)


@pytest.fixture
def served(target: Target, module_launch, request: pytest.FixtureRequest) -> Iterator[Target]:
    """The module's service. After a failed test (it may have left a poison message or a broken service behind)
    the service is replaced by a fresh one on emptied queues, so that each test's verdict is its own; the clients
    connect again if the broker closed them."""
    for name, url in (("attacker", target.attacker_url), ("observer", target.observer_url)):
        if not getattr(target, name).connection.is_open:
            setattr(target, name, _client(url))
    if target.dirty or not target.service.running or target.service.consumer_restarts():
        target.service.kill()
        for queue in [*SERVICE_QUEUES, *map(dlq, SERVICE_QUEUES), *RECIPIENT_QUEUES]:
            target.observer.channel.queue_purge(queue)
        _launched(target, module_launch(**SETTINGS))
    yield target
    report = getattr(request.node, "rep_call", None)
    target.dirty = report is None or report.failed


def _publish(target: Target, hostile: Hostile) -> Any:
    """Publish the hostile message as the attacker; returns its message_id as sent."""
    message_id = f"hostile-{uuid.uuid4()}" if hostile.message_id == "fresh" else hostile.message_id
    body = hostile.body if hostile.body is not None else json.dumps(
        {"certificate": certificate(new_id(), new_patient())}).encode()
    reply_to = target.attacker.reply_queue if hostile.reply_to == "ours" else hostile.reply_to
    extra = {"user_id": target.attacker_user} if hostile.own_user_id else {}
    try:
        with amqp_doubles():
            target.attacker.send(hostile.routing_key, body, message_id=message_id, reply=False, reply_to=reply_to,
                                 correlation_id=hostile.correlation_id, type=hostile.type,
                                 content_type=hostile.content_type, headers=hostile.headers or None, **extra)
    except (ChannelClosedByBroker, ConnectionClosedByBroker):
        target.attacker.close()
        target.attacker = _client(target.attacker_url)
        reject()  # the broker refused it: it never reaches the service
    return message_id


def _dead_letters(wire: Wire) -> dict[str, list[Msg]]:
    return {queue: wire.take(dlq(queue), settle=0.3) for queue in SERVICE_QUEUES}


def _assert_clean_dead_letter(letter: Msg, hostile: Hostile) -> None:
    headers = letter.headers
    assert "x-intyg-error-code" in headers, headers
    assert "CC" not in headers and "BCC" not in headers, f"the client's CC/BCC was copied: {headers}"
    copied = {k: v for k, v in hostile.forged().items() if headers.get(k) == v}
    assert not copied, f"the client's own x-intyg-* values were copied onto the dead letter: {copied}"


def _restarts(service: ServiceProcess) -> str:
    restarts = service.consumer_restarts()
    if not restarts:
        return "no consumer restarted (yet)"
    last = restarts[-1]
    why = (last.get("exception") or "").strip().splitlines()[-1:] or [last.get("event", "")[:300]]
    return f"{len(restarts)} consumer restart lines in the log, the last: {why[0]}"


def check_batch_survives(target: Target, hostile: Hostile) -> None:
    """The rules of this module for one hostile message sent between two valid registrations."""
    service, observer = target.service, target.observer
    first = observer.send("certificate.register", {"certificate": certificate(new_id(), new_patient())})
    message_id = _publish(target, hostile)
    second = observer.send("certificate.register", {"certificate": certificate(new_id(), new_patient())})

    verdict = hostile.verdict()
    try:
        for valid in (first, second):
            check_reply(observer, valid, "OK", timeout=REPLY_WITHIN_S)
        if verdict:  # it must reach its DLQ
            observer.pump_until(lambda: sum(observer.ready(dlq(q)) for q in SERVICE_QUEUES) > 0, REPLY_WITHIN_S,
                                "no dead letter for the invalid message")
    except AssertionError as failed:
        raise AssertionError(f"{failed}; {_restarts(service)}") from None
    observer.pump(0.5)  # copies that went elsewhere show up meanwhile
    letters = _dead_letters(observer)
    injected = {queue: observer.take(queue, settle=0.1) for queue in RECIPIENT_QUEUES}
    assert not any(injected.values()), "delivered to a recipient: " + repr(
        {q: [(m.routing_key, m.headers, m.raw[:200]) for m in msgs] for q, msgs in injected.items() if msgs})

    assert not service.consumer_restarts(), _restarts(service)
    counts = {queue: observer.consumers(queue) for queue in SERVICE_QUEUES}
    assert counts == target.consumers, f"consumers on the service queues: {counts}, at the start {target.consumers}"

    found = [(queue, letter) for queue, got in letters.items() for letter in got]
    if verdict is False:
        assert not found, f"a valid message was dead-lettered: {[(q, m.headers) for q, m in found]}"
        return
    if verdict:
        assert len(found) == 1, f"{len(found)} dead letters for one invalid message: " \
                                f"{[(q, m.properties.message_id, m.headers) for q, m in found][:5]}"
        [(queue, letter)] = found
        assert queue == QUEUE_OF[hostile.routing_key], queue
        if _clean_text(message_id) and 1 <= len(message_id) <= 128:  # a usable id is kept (§8)
            assert letter.properties.message_id == message_id
    assert len(found) <= 1, f"{len(found)} dead letters for one message"
    for _, letter in found:
        _assert_clean_dead_letter(letter, hostile)


# --------------------------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------------------------


# The attacks issue 6 confirmed or found by reading, and two more of their classes, each a test of its own.
KNOWN_ATTACKS = {
    "cc-header-on-a-broken-body": Hostile(body_kind="broken", body=b"{", headers={"CC": ["recipient.FKASSA"]}),
    "bcc-header-naming-a-service-queue": Hostile(body_kind="shape", body=b"{}",
                                                 headers={"BCC": ["intyg.registration"]}),
    "non-utf8-message-id": Hostile(message_id=b"\xff\xfe-not-utf-8"),
    "nul-in-message-id": Hostile(message_id="nul-\x00-id"),
    "reply-to-naming-a-recipient-queue": Hostile(body_kind="broken", body=b"{", reply_to="recipient.FKASSA"),
    "message-id-of-255-characters": Hostile(message_id="m" * 255),  # the reply's id, "reply-" + it, cannot be sent
    "a-double-header-beyond-64-bit-integers": Hostile(body_kind="broken", body=b"[", headers={"x-double": 1.5e300}),
    "odd-header-types-on-a-broken-body": Hostile(body_kind="broken", body=b"[", headers={
        "x-double": 2.5, "x-decimal": decimal.Decimal("-12.345"), "x-when": dt.datetime(2001, 2, 3, 4, 5, 6),
        "x-nested": {"a": [b"\xff", None, {"b": "nul\x00"}], "c": True}, "x-huge": "h" * 100_000}),
    "forged-retry-bookkeeping-on-a-broken-body": Hostile(body_kind="broken", body=b"{",
                                                         headers={k: v[0] for k, v in FORGED.items()}),
}


@pytest.mark.parametrize("hostile", KNOWN_ATTACKS.values(), ids=KNOWN_ATTACKS.keys())
def test_a_known_attack_affects_only_itself_and_reaches_no_recipient(served: Target, hostile: Hostile) -> None:
    check_batch_survives(served, hostile)


@settings(max_examples=40, deadline=None, report_multiple_bugs=False,
          # A broken service fails every later example: shrinking would blame an innocent one, so the first
          # failing example is reported as found.
          phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(hostile=hostile_messages())
def test_a_hostile_message_affects_only_itself_and_reaches_no_recipient(served: Target, hostile: Hostile) -> None:
    check_batch_survives(served, hostile)


def test_an_unknown_message_type_is_answered_invalid_and_kept_in_the_unrouted_dlq(served: Target, module_stack):
    """CONTRACT v1.1 §1: `intyg.commands` has the alternate exchange `intyg.unrouted`; the service answers what
    lands there INVALID_MESSAGE ("unknown message type") and moves it to `intyg.unrouted.dlq`."""
    wire = Wire(module_stack.amqp_url, tap_events=False)  # a 404 must not break the rest
    try:
        message_id = wire.send("certificate.hack", {"certificate_id": "c-1"}, exchange=COMMANDS_EXCHANGE,
                               mandatory=False)
        body = check_reply(wire, message_id, "ERROR", "INVALID_MESSAGE", timeout=REPLY_WITHIN_S)
        assert "unknown message type" in body["message"], body
        [letter] = wire.take("intyg.unrouted.dlq", count=1, timeout=10)
        assert letter.properties.message_id == message_id
        check_dead_letter(letter, code="INVALID_MESSAGE", routing_key="certificate.hack",
                          error_contains="unknown message type")
        assert wire.ready("intyg.unrouted") == 0
    finally:
        wire.close()
    assert not served.service.consumer_restarts()
