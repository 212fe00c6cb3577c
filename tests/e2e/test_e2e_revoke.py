"""A revoke that overtakes its register (CONTRACT §5): it waits for the register within `REVOKE_WAIT_S`, and
after the window it is answered NOT_FOUND and dead-lettered; `intygstjanst dlq replay` applies it later, once."""
from __future__ import annotations

import json
import time

import pytest

try:
    from tests.e2e.common import BY, CG, certificate, check_dead_letter, check_event, check_reply, revoke_body
    from tests.e2e.harness import Msg, dlq_cli, new_id, new_patient
except ImportError:  # tests/ itself on sys.path
    from e2e.common import BY, CG, certificate, check_dead_letter, check_event, check_reply, revoke_body
    from e2e.harness import Msg, dlq_cli, new_id, new_patient

pytestmark = pytest.mark.integration

REVOKE_WAIT_S = 2


def test_a_revoke_that_overtakes_its_register_is_applied_when_the_register_arrives(launch, wire, stack):
    launch(REVOKE_WAIT_S=REVOKE_WAIT_S)
    cid, p = new_id(), new_patient()
    revoke = wire.send("certificate.revoke", revoke_body(cid, p))
    wire.pump(0.7)
    assert revoke not in wire.replies  # not answered while it waits
    register = wire.send("certificate.register", {"certificate": certificate(cid, p)})
    check_reply(wire, register, "OK")
    check_reply(wire, revoke, "OK", timeout=10)

    care = check_reply(wire, wire.send("certificate.get-for-care", {"certificate_id": cid, "care_giver_id": CG, **BY}),
                       "OK")
    assert care["data"]["revoked"] is True and care["data"]["revoked_at"]
    assert [s["status"] for s in care["data"]["statuses"]] == ["RECEIVED", "REVOKED"]
    wire.wait_events("certificate.revoked", certificate_id=cid)
    wire.pump(0.5)
    order = [e.routing_key for e in wire.events if e.routing_key.startswith("certificate.")]
    assert order == ["certificate.registered", "certificate.revoked"]  # in the order they happened
    assert [e.body["action"] for e in wire.events_where("access.logged")] == ["REVOKE", "READ"]
    for event in wire.events:
        check_event(event)
    assert len(wire.replies[revoke]) == 1
    assert wire.ready("intyg.status.dlq") == 0


def test_a_revoke_whose_register_never_comes_is_not_found_and_dead_lettered_and_a_replay_applies_it_once(
        launch, wire, stack):
    launch(REVOKE_WAIT_S=REVOKE_WAIT_S)
    cid, p = new_id(), new_patient()
    started = time.monotonic()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    revoke = wire.send("certificate.revoke", revoke_body(cid, p), headers={"traceparent": traceparent})
    check_reply(wire, revoke, "ERROR", "NOT_FOUND", timeout=15)
    assert time.monotonic() - started >= REVOKE_WAIT_S

    wire.pump_until(lambda: wire.ready("intyg.status.dlq") == 1, 10, "the dead letter")
    shown = dlq_cli(stack.amqp_url, "show", "intyg.status", "--json")
    assert shown.returncode == 0, shown.stderr
    [letter] = json.loads(shown.stdout)
    assert letter["message_id"] == revoke and letter["routing_key"] == "certificate.revoke"
    headers = letter["headers"]
    check_dead_letter(Msg("", type("P", (), {"headers": headers})(), b""), code="NOT_FOUND",
                      routing_key="certificate.revoke", error_contains="not found", attempts=None)
    assert headers["x-intyg-attempts"] >= 3 and headers["traceparent"] == traceparent

    check_reply(wire, wire.send("certificate.register", {"certificate": certificate(cid, p)}), "OK")
    replayed = dlq_cli(stack.amqp_url, "replay", "intyg.status", "--id", revoke)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "replayed 1 of 1" in replayed.stdout
    wire.pump_until(lambda: len(wire.replies[revoke]) >= 2, 15, "the reply to the replayed revoke")
    applied = wire.replies[revoke][1].body
    assert (applied["result"], applied["request_id"]) == ("OK", revoke), applied

    # once: a second replay finds nothing, a resend of the same message_id is answered the same and changes nothing
    again = dlq_cli(stack.amqp_url, "replay", "intyg.status", "--id", revoke)
    assert again.returncode == 1 and "not found" in again.stderr
    wire.send("certificate.revoke", revoke_body(cid, p), message_id=revoke)
    wire.pump_until(lambda: len(wire.replies[revoke]) >= 3, 15, "the reply to the resend")
    assert wire.replies[revoke][2].body == applied
    wire.pump(0.5)
    assert len(wire.events_where("certificate.revoked", certificate_id=cid)) == 1
    assert stack.db.scalar("select count(*) from certificate_statuses where certificate_id = %s and "
                           "status = 'REVOKED'", cid) == 1
    assert wire.ready("intyg.status.dlq") == 0
