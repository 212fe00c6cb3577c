"""From an AMQP delivery to a committed answer: parse and check the envelope, authorise, apply the message once
(inbox, which keeps its reply) and queue its events (outbox) in the same transaction. No pika here: the loop in
`consumers.loop` feeds it deliveries, publishes the replies once the transaction is committed and owns acks,
retries and dead letters. (A reply needs no outbox row: the delivery is acknowledged only once its reply is with
the broker, and a redelivery after a crash is answered from the inbox.)"""
from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ValidationError

from contracts.events import RecipientCertificateRevoked, RecipientCertificateSent
from contracts.access import ACCESS_LOG_REQUIRED
from contracts.properties import MESSAGE_ID_MAX_LENGTH
from contracts.replies import Code, Reply
from contracts.topology import EVENTS_EXCHANGE
from consumers.context import Caller, Context, Handled
from consumers.envelope import Envelope
from consumers.routes import OPERATOR, ROUTES, Route, care_giver_named, role_needed
from consumers.wire import reply_for_refusal
from domain.errors import Refused
from domain.privacy import scrub
from domain.model import Catalogue
from storage.outbox import OutboxMessage


@dataclass(frozen=True)
class Policy:
    """The settings the pipeline obeys."""

    catalogue: Catalogue
    max_body_bytes: int = 4 * 1024 * 1024
    enforce_roles: bool = False
    roles: Mapping[str, tuple[str, frozenset[str] | None]] = field(default_factory=dict)  # user -> role, givers
    bulk_batch_size: int = 500
    access_log_required: bool = True  # §9: care messages must name who accesses


class Invalid(Exception):
    """The message cannot be handled at all: answered (when possible) and dead-lettered, never retried."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class RetryLater(Exception):
    """Not applicable yet (a revoke that overtook its register): retried with back-off within a window."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.message)
        self.reply = reply


@dataclass(frozen=True)
class Parsed:
    envelope: Envelope
    route: Route
    message: BaseModel
    trace: Mapping[str, str] = field(default_factory=dict)  # the trace context its reply and events carry

    @property
    def message_id(self) -> str:
        assert self.envelope.message_id is not None
        return self.envelope.message_id


@dataclass
class Processed:
    reply: Reply | None
    outcome: str  # what the log line says: OK, an INFO/ERROR code, DUPLICATE
    more: bool = False


def parse(envelope: Envelope, policy: Policy, trace: Mapping[str, str] | None = None) -> Parsed:
    """`trace`: the trace context of the message's handling (default: the one it came with)."""
    if envelope.problem:
        raise Invalid(Code.INVALID_MESSAGE, envelope.problem)
    if not envelope.message_id or len(envelope.message_id) > MESSAGE_ID_MAX_LENGTH:
        raise Invalid(Code.INVALID_MESSAGE, f"message_id is required (1-{MESSAGE_ID_MAX_LENGTH} characters)")
    route = ROUTES.get(envelope.routing_key)
    if route is None:
        raise Invalid(Code.INVALID_MESSAGE, f"unknown routing key {quoted(envelope.routing_key)}")
    if envelope.type is not None and envelope.type != envelope.routing_key:
        raise Invalid(Code.INVALID_MESSAGE, f"type {quoted(envelope.type)} does not match routing key")
    if envelope.content_type not in (None, "", "application/json"):
        raise Invalid(Code.INVALID_MESSAGE, f"content_type must be application/json, not {quoted(envelope.content_type)}")
    if route.query and not envelope.reply_to:
        raise Invalid(Code.INVALID_MESSAGE, "a query needs reply_to")
    if len(envelope.body) > policy.max_body_bytes:
        raise Invalid(Code.INVALID_MESSAGE, f"body is larger than {policy.max_body_bytes} bytes")
    if b"\\" in envelope.body and escapes_nul(envelope.body):
        # PostgreSQL text cannot hold NUL; refusing it here beats a dead letter from the database. (The one-byte
        # search is a memchr, 0.2 us for 20 KB; the six-byte one costs 10 us, and most bodies hold no backslash.)
        raise Invalid(Code.INVALID_MESSAGE, "text may not contain NUL characters (\\u0000)")
    try:
        # strict: a JSON string is not a bool nor a number ("given": "no" must not withdraw consent)
        message = route.model.model_validate_json(envelope.body, strict=True, context={
            ACCESS_LOG_REQUIRED: policy.access_log_required})
    except ValidationError as error:
        raise _invalid(error) from None
    return Parsed(envelope, route, message, envelope.trace if trace is None else trace)


def escapes_nul(body: bytes) -> bool:
    """Does the JSON text `body` write a NUL character (`\\u0000`)? Not when the backslash is itself escaped: the
    text `\\\\u0000` is a backslash and five characters, which a document may well hold."""
    at = body.find(b"\\u0000")
    while at >= 0:
        start = at
        while start > 0 and body[start - 1] == 0x5C:  # the backslashes before it
            start -= 1
        if (at - start) % 2 == 0:  # an even number of them escape each other: this one begins an escape
            return True
        at = body.find(b"\\u0000", at + 1)
    return False


def quoted(value: str) -> str:
    """A client's value in a reply text: short, and never a personnummer (§3)."""
    return repr(scrub(value[:64]) + ("…" if len(value) > 64 else ""))


def _invalid(error: ValidationError) -> Invalid:
    """Name every field that is wrong, never the value (it may be a personnummer)."""
    problems = error.errors(include_input=False, include_url=False)
    if any(p["type"] == "json_invalid" for p in problems):
        return Invalid(Code.INVALID_MESSAGE, "body is not a JSON object")
    if problems and all(p["type"] == "model_type" and not p["loc"] for p in problems):
        return Invalid(Code.INVALID_MESSAGE, "body is not a JSON object")
    text = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'body'}: {p['msg']}" for p in problems)
    only_patient = all(p["loc"] and p["loc"][-1] == "patient_id" and p["type"] in ("value_error", "string_too_long")
                       for p in problems)
    return Invalid(Code.INVALID_PERSONNUMMER if only_patient else Code.INVALID_MESSAGE, text)


def authorize(parsed: Parsed, policy: Policy) -> Caller:
    """§8: with roles enforced, a broker user outside the message type's role is refused FORBIDDEN."""
    if not policy.enforce_roles:
        return Caller()
    envelope = parsed.envelope
    role = policy.roles.get(envelope.user_id or "")
    if role and role[0] == OPERATOR and envelope.origin_user:
        # An operator's replay of a dead letter acts as its original sender, which only our signed bookkeeping
        # names (consumers.envelope); never as a user some client's header names.
        role = policy.roles.get(envelope.origin_user)
    if role is None or role[0] not in role_needed(parsed.message, parsed.route):
        raise Refused("FORBIDDEN", f"user may not send {envelope.routing_key}")
    caller = Caller(role[0], role[1] if role[0] != OPERATOR else None)
    giver = care_giver_named(parsed.message)
    if giver is not None and role[0] != OPERATOR and not caller.may_act_for(giver):
        raise Refused("FORBIDDEN", "user may not act for that care giver")
    return caller


def process(parsed: Parsed, uow: Any, policy: Policy, now: dt.datetime | None = None) -> Processed:
    """Apply one parsed message inside the caller's transaction (`uow`), which the caller commits."""
    ctx = Context(request_id=parsed.message_id, now=now or dt.datetime.now(dt.UTC), catalogue=policy.catalogue,
                  bulk_batch_size=policy.bulk_batch_size)
    try:
        ctx = replace(ctx, caller=authorize(parsed, policy))
    except Refused as refusal:
        # Not remembered in the inbox: the same message_id from an entitled sender must still apply.
        return Processed(reply_for_refusal(refusal, ctx.request_id), refusal.code)
    if parsed.route.query:
        return _query(parsed, uow, ctx)
    seen = uow.inbox.get(parsed.message_id)
    if seen is not None:
        reply = Reply.model_validate(seen["reply"])
        return Processed(reply, "DUPLICATE")
    try:
        handled: Handled = parsed.route.handler(parsed.message, uow, ctx)
    except Refused as refusal:
        reply = reply_for_refusal(refusal, ctx.request_id)
        if refusal.retry_until_found:
            raise RetryLater(reply) from None
        handled = Handled(reply)
    if handled.more:
        uow.outbox.add(_event_messages(handled, parsed.trace))
        return Processed(None, "IN_PROGRESS", more=True)
    assert handled.reply is not None
    uow.inbox.add(parsed.message_id, parsed.envelope.routing_key, handled.reply.model_dump(mode="json"))
    events = _event_messages(handled, parsed.trace)
    if events:
        uow.outbox.add(events)
    return Processed(handled.reply, _outcome(handled.reply))


def _query(parsed: Parsed, uow: Any, ctx: Context) -> Processed:
    try:
        reply = parsed.route.handler(parsed.message, uow, ctx).reply
    except Refused as refusal:
        if refusal.code == Code.INVALID_MESSAGE.value:  # e.g. a tampered page_token: answered and dead-lettered
            raise Invalid(Code.INVALID_MESSAGE, refusal.message) from None
        reply = reply_for_refusal(refusal, ctx.request_id)
    return Processed(reply, _outcome(reply))


def _event_messages(handled: Handled, trace: Mapping[str, str]) -> list[OutboxMessage]:
    """Each event is ordered behind the earlier events of its certificate (`ordering_key`); a recipient delivery
    carries the patient (and for `sent` the whole certificate), so it is erased once published, never kept."""
    return [OutboxMessage(kind="event", exchange=EVENTS_EXCHANGE, routing_key=e.type, message_id=e.event_id,
                          body=e.model_dump_json().encode(), headers=trace, ordering_key=_certificate_of(e),
                          erase_when_published=isinstance(e, RECIPIENT_DELIVERIES))
            for e in handled.events]


RECIPIENT_DELIVERIES = (RecipientCertificateSent, RecipientCertificateRevoked)


def _certificate_of(event: Any) -> str:
    if isinstance(event, RecipientCertificateSent):  # carries the whole certificate
        return event.certificate.id
    return event.certificate_id


def _outcome(reply: Reply) -> str:
    return reply.code.value if reply.code else reply.result.value


def subject(parsed: Parsed) -> str | None:
    """The certificate a message is about, for the log line and the batch warm-up. (Looks at the model's fields
    rather than `getattr(message, name, None)`: a missing attribute costs pydantic an exception.)"""
    message = parsed.message
    fields = type(message).model_fields
    if "certificate_id" in fields and message.certificate_id:
        return message.certificate_id
    certificate = message.certificate if "certificate" in fields else None
    return certificate.id if certificate is not None else None


def error_reply(envelope: Envelope, code: Code, message: str) -> Reply:
    return Reply.for_code(code, envelope.message_id or "", message)
