"""Assertions shared by the end-to-end tests: the reply shape (CONTRACT §3), the event shape (§7), dead letters
(§8), and certificates to register (§4)."""
from __future__ import annotations

import datetime as dt
import re
import secrets
from typing import Any

try:
    from tests import factories
    from tests.e2e.harness import Msg, Wire, walk
except ImportError:  # tests/ itself on sys.path
    import factories
    from e2e.harness import Msg, Wire, walk

CG, CU = "SE2321000016-1000", "SE2321000016-1004"
CG2, CU2 = "SE2321000016-2000", "SE2321000016-2004"
DOCTOR = {"person_id": "SE2321000016-1003", "name": "Ajla Doktor"}
BY = {"accessed_by": factories.ACCESSED_BY}  # CONTRACT §9: every care message names who accesses

REPLY_KEYS = {"result", "error_id", "code", "message", "request_id", "data"}
ERROR_IDS = {"INVALID_MESSAGE": "VALIDATION_ERROR", "INVALID_PERSONNUMMER": "VALIDATION_ERROR",
             "UNKNOWN_CERTIFICATE_TYPE": "VALIDATION_ERROR", "CONFLICT": "VALIDATION_ERROR",
             "TEST_CERTIFICATE": "VALIDATION_ERROR", "NOT_FOUND": "APPLICATION_ERROR",
             "NO_CONSENT": "APPLICATION_ERROR", "PURGED": "APPLICATION_ERROR", "UNKNOWN_RECIPIENT": "APPLICATION_ERROR",
             "RECIPIENT_REJECTS_TYPE": "APPLICATION_ERROR", "FORBIDDEN": "APPLICATION_ERROR", "REVOKED": "REVOKED",
             "UNAVAILABLE": "TECHNICAL_ERROR"}
INFO_CODES = {"ALREADY_EXISTS", "ALREADY_REVOKED", "ALREADY_SENT", "NO_CHANGE"}
PERSONNUMMER_LIKE = re.compile(r"(?<!\d)(?:\d{2})?\d{6}[-+]?\d{4}(?!\d)")

# §7: the extra fields of each event (besides event_id, type, occurred_at).
EVENT_FIELDS = {
    "certificate.registered": {"certificate_id", "certificate_type", "care_unit_id", "care_giver_id", "signed_at",
                               "test_certificate"},
    "certificate.revoked": {"certificate_id", "certificate_type", "care_giver_id"},
    "certificate.sent": {"certificate_id", "certificate_type", "recipient_id", "sent_by"},
    "certificate.archived": {"certificate_id"},
    "certificate.restored": {"certificate_id"},
    "certificate.care-copy-removed": {"certificate_id", "care_giver_id"},
    "certificate.purged": {"certificate_id", "reason"},
    "sent": {"recipient_id", "sent_by", "certificate"},
    "revoked": {"recipient_id", "certificate_id", "patient_id", "reason"},
    "access.logged": {"at", "action", "certificate_id", "certificate_type", "patient_id", "person_id", "person_name",
                      "care_unit_id", "care_giver_id"},
}

DEAD_LETTER_HEADERS = ("x-intyg-error-code", "x-intyg-error", "x-intyg-attempts", "x-intyg-original-routing-key",
                       "x-intyg-dead-lettered-at")


def certificate(cid: str, patient: str, *, care_giver: str = CG, care_unit: str = CU, **over: Any) -> dict[str, Any]:
    return factories.certificate_json(id=cid, patient_id=patient, issued_by=factories.issued_by(care_giver, care_unit),
                                      **over)


def revoke_body(cid: str, patient: str, reason: str | None = "fel patient") -> dict[str, Any]:
    return {"certificate_id": cid, "patient_id": patient, "revoked_by": DOCTOR, "reason": reason, **BY}


def check_reply(wire: Wire, message_id: str, result: str, code: str | None = None, *,
                correlation_id: str | None = None, timeout: float = 15.0) -> dict[str, Any]:
    """The (first) reply to `message_id` has the §3 shape, the expected result/code/error_id, `request_id` =
    message_id and the request's correlation id (or its message_id); returns its body."""
    msg = wire.reply_msg(correlation_id or message_id, timeout)
    body = msg.body
    assert set(body) == REPLY_KEYS, body
    assert (body["result"], body["code"]) == (result, code), body
    expected_error_id = ERROR_IDS.get(code) if result == "ERROR" else None
    assert body["error_id"] == expected_error_id, body
    if result == "INFO":
        assert code in INFO_CODES
    assert body["request_id"] == message_id, body
    assert msg.properties.correlation_id == (correlation_id or message_id)
    assert msg.properties.content_type == "application/json"
    assert isinstance(body["message"], str) and body["message"]
    assert not PERSONNUMMER_LIKE.search(body["message"]), body["message"]
    return body


def check_event(msg: Msg) -> dict[str, Any]:
    """§7: persistent, JSON, message_id = event_id, type = routing key, the table's fields exactly; broadcast
    events carry neither a patient id nor a document. Access log entries (§9) too."""
    body, props = msg.body, msg.properties
    assert msg.exchange == "intyg.events"
    assert props.delivery_mode == 2, msg
    assert props.content_type == "application/json"
    assert props.type == msg.routing_key == body["type"]
    assert props.message_id == body["event_id"] and body["event_id"]
    dt.datetime.fromisoformat(body["occurred_at"].replace("Z", "+00:00"))
    if msg.routing_key.startswith("certificate."):
        fields = EVENT_FIELDS[msg.routing_key]
        keys = {k for k, _ in walk(body)}
        assert "patient_id" not in keys and "document" not in keys, body
    elif msg.routing_key == "access.logged":  # for the national log's queue only: with the patient
        fields = EVENT_FIELDS[msg.routing_key]
    else:
        assert msg.routing_key.startswith("recipient.")
        fields = EVENT_FIELDS[msg.routing_key.rsplit(".", 1)[-1]]
    assert set(body) == {"event_id", "type", "occurred_at"} | fields, body
    return body


def check_dead_letter(letter: Msg, *, code: str, routing_key: str, error_contains: str = "",
                      attempts: int | None = 1) -> dict[str, Any]:
    headers = letter.headers
    for name in DEAD_LETTER_HEADERS:
        assert name in headers, (name, headers)
    text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    assert text(headers["x-intyg-error-code"]) == code, headers
    assert error_contains in text(headers["x-intyg-error"]), headers
    assert text(headers["x-intyg-original-routing-key"]) == routing_key, headers
    if attempts is not None:
        assert headers["x-intyg-attempts"] == attempts, headers
    at = dt.datetime.fromisoformat(text(headers["x-intyg-dead-lettered-at"]).replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - at).total_seconds()) < 120
    return headers


def new_broker_users(broker_users: Any, prefix: str, roles: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """One new broker user per role, with no rights yet: role -> (user name, password)."""
    accounts = {role: (broker_users.unique(f"{prefix}-{role}"), secrets.token_hex(8)) for role in roles}
    for user, password in accounts.values():
        broker_users.add(user, password)
    return accounts


def grant_users(stack: Any, accounts: dict[str, tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Give each user access to the stack's vhost: (role -> user name, role -> AMQP URL)."""
    return ({role: user for role, (user, _) in accounts.items()},
            {role: stack.grant(user, password) for role, (user, password) in accounts.items()})


def broker_users_for(broker_users: Any, stack: Any, prefix: str,
                     roles: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """One broker user per role, with access to the stack's vhost: (role -> user name, role -> AMQP URL)."""
    return grant_users(stack, new_broker_users(broker_users, prefix, roles))
