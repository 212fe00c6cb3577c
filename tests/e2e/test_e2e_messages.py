"""End to end through RabbitMQ with the service as a subprocess: every message type (CONTRACT §5, §6) with its reply
(§3), its events and recipient deliveries (§7); duplicates (§2); invalid messages and business refusals (§8)."""
from __future__ import annotations

import json
import uuid
from collections import Counter

import pytest

try:
    from tests.e2e.common import (BY, CG, CG2, CU, CU2, certificate, check_dead_letter, check_event, check_reply,
                                  revoke_body)
    from tests.e2e.harness import new_id, new_patient
except ImportError:  # tests/ itself on sys.path
    from e2e.common import BY, CG, CG2, CU, CU2, certificate, check_dead_letter, check_event, check_reply, revoke_body
    from e2e.harness import new_id, new_patient

from service.client import Client

pytestmark = pytest.mark.integration


def test_every_message_type_is_answered_with_its_reply_events_and_recipient_deliveries(launch, wire, stack):
    service = launch()
    p, p2 = new_patient(), new_patient()
    c1, c2, c3, c4 = (new_id(x) for x in ("c1", "c2", "c3", "c4"))
    cert1 = certificate(c1, p)

    def ok(routing_key, body, result="OK", code=None, **props):
        mid = wire.send(routing_key, body, **props)
        return check_reply(wire, mid, result, code, correlation_id=props.get("correlation_id"))

    # queries before anything exists; recipient.list over RabbitMQ's direct reply-to as well
    assert ok("consent.get", {"patient_id": p})["data"] == {"given": False, "changed_at": None}
    with Client(stack.amqp_url) as direct:
        listed = direct.call("recipient.list", {"certificate_type": "lisjp"}, message_id="direct-1")
    assert listed["result"] == "OK" and listed["request_id"] == "direct-1"
    [fkassa] = listed["data"]["recipients"]
    assert {**fkassa, "certificate_types": sorted(fkassa["certificate_types"])} == {
        "id": "FKASSA", "name": "Försäkringskassan", "trusted": True, "active": True,
        "certificate_types": sorted(["fk7263", "lisjp", "luse", "luae_na", "luae_fs"])}
    assert len(ok("recipient.list", {"certificate_type": None})["data"]["recipients"]) == 5

    # certificate.register (correlation_id copied to the reply)
    body = ok("certificate.register", {"certificate": cert1}, correlation_id="corr-register-1")
    assert body["data"] is None or isinstance(body["data"], dict)
    ok("certificate.register", {"certificate": cert1}, "INFO", "ALREADY_EXISTS")
    ok("certificate.register", {"certificate": {**cert1, "type_version": "9.9"}}, "ERROR", "CONFLICT")
    ok("certificate.register", {"certificate": certificate(new_id(), p, type="nonsense")}, "ERROR",
       "UNKNOWN_CERTIFICATE_TYPE")
    ok("certificate.register", {"certificate": certificate(c2, p, test_certificate=True)})
    ok("certificate.register", {"certificate": certificate(c3, p, care_giver=CG2, care_unit=CU2)})
    ok("certificate.register", {"certificate": certificate(c4, p2, care_giver=CG2, care_unit=CU2)})

    # citizen side: no consent, then consent
    ok("certificate.list", {"patient_id": p}, "ERROR", "NO_CONSENT")
    assert ok("consent.set", {"patient_id": p, "given": True})["result"] == "OK"
    ok("consent.set", {"patient_id": p, "given": True}, "INFO", "NO_CHANGE")
    consent = ok("consent.get", {"patient_id": p})["data"]
    assert consent["given"] is True and consent["changed_at"]

    got = ok("certificate.get", {"certificate_id": c1, "patient_id": p})["data"]
    assert got["document"] == cert1["document"]
    assert {k: got[k] for k in cert1} == cert1  # every Certificate field as registered, document byte for byte
    assert got["revoked"] is False and got["revoked_at"] is None and got["sent_to"] == []
    assert got["archived"] is False and got["available_to_care"] is True
    assert [s["status"] for s in got["statuses"]] == ["RECEIVED"]
    ok("certificate.get", {"certificate_id": c4, "patient_id": p}, "ERROR", "NOT_FOUND")  # someone else's

    page = ok("certificate.list", {"patient_id": p})["data"]
    assert sorted(c["id"] for c in page["certificates"]) == sorted([c1, c2, c3])
    assert all("document" not in c for c in page["certificates"]) and page["next_page_token"] is None

    for_care = ok("certificate.get-for-care", {"certificate_id": c1, "care_giver_id": CG, **BY})["data"]
    assert for_care["document"] == cert1["document"] and "archived" not in for_care
    ok("certificate.get-for-care", {"certificate_id": c1, "care_giver_id": CG2, **BY}, "ERROR", "NOT_FOUND")
    care_list = ok("certificate.list-for-care",
                   {"patient_id": p, "care_giver_id": CG, "care_unit_ids": [CU], **BY})["data"]
    assert sorted(c["id"] for c in care_list["certificates"]) == sorted([c1, c2])

    # certificate.send: whole certificate to the recipient; refusals answered
    sent = ok("certificate.send", {"certificate_id": c1, "patient_id": p, "recipient_id": "FKASSA",
                                   "sent_by": "CITIZEN", "care_giver_id": None})
    assert sent["result"] == "OK"
    ok("certificate.send", {"certificate_id": c1, "patient_id": p, "recipient_id": "FKASSA", "sent_by": "CARE",
                            "care_giver_id": CG, **BY}, "INFO", "ALREADY_SENT")
    ok("certificate.send", {"certificate_id": c1, "patient_id": p, "recipient_id": "TRANSP", "sent_by": "CITIZEN"},
       "ERROR", "RECIPIENT_REJECTS_TYPE")
    ok("certificate.send", {"certificate_id": c1, "patient_id": p, "recipient_id": "NOPE", "sent_by": "CITIZEN"},
       "ERROR", "UNKNOWN_RECIPIENT")
    ok("certificate.send", {"certificate_id": c2, "patient_id": p, "recipient_id": "FKASSA", "sent_by": "CITIZEN"},
       "ERROR", "TEST_CERTIFICATE")

    # certificate.set-status: archive, restore
    ok("certificate.set-status", {"certificate_id": c1, "patient_id": p, "status": "ARCHIVED"})
    ok("certificate.set-status", {"certificate_id": c1, "patient_id": p, "status": "ARCHIVED"}, "INFO", "NO_CHANGE")
    archived = ok("certificate.list", {"patient_id": p, "archived": True})["data"]["certificates"]
    assert [c["id"] for c in archived] == [c1]
    for_care = ok("certificate.get-for-care", {"certificate_id": c1, "care_giver_id": CG, **BY})["data"]
    assert {s["status"] for s in for_care["statuses"]} == {"RECEIVED", "SENT"}  # care never sees ARCHIVED
    ok("certificate.set-status", {"certificate_id": c1, "patient_id": p, "status": "RESTORED"})

    # certificate.revoke: broadcast + one delivery per recipient it was sent to; a test certificate has none
    ok("certificate.revoke", revoke_body(c1, p))
    ok("certificate.revoke", revoke_body(c1, p), "INFO", "ALREADY_REVOKED")
    ok("certificate.send", {"certificate_id": c1, "patient_id": p, "recipient_id": "AF", "sent_by": "CITIZEN"},
       "ERROR", "REVOKED")
    ok("certificate.revoke", revoke_body(c2, p))
    got = ok("certificate.get", {"certificate_id": c1, "patient_id": p})["data"]
    assert got["revoked"] is True and got["revoked_at"] and got["sent_to"] == ["FKASSA"]
    assert [s["status"] for s in got["statuses"]] == ["RECEIVED", "SENT", "ARCHIVED", "RESTORED", "REVOKED"]
    assert got["statuses"][1]["target"] == "FKASSA"

    # certificate.remove-care-copy (consent given: the citizen keeps it)
    removed = ok("certificate.remove-care-copy", {"certificate_id": c1, "care_giver_id": CG, **BY})
    assert removed["data"]["outcome"] == "CITIZEN_ONLY"
    ok("certificate.remove-care-copy", {"certificate_id": c1, "care_giver_id": CG, **BY}, "INFO", "NO_CHANGE")
    ok("certificate.get-for-care", {"certificate_id": c1, "care_giver_id": CG, **BY}, "ERROR", "NOT_FOUND")

    # care-giver.remove-care-copies: c3 (consent) kept for the citizen, c4 (no consent) purged
    left = ok("care-giver.remove-care-copies", {"care_giver_id": CG2, **BY})
    assert left["data"] == {"citizen_only": 1, "purged": 1}

    # consent.set withdrawn: purges what care no longer has (c1, c3); c2 is still care's
    withdrawn = ok("consent.set", {"patient_id": p, "given": False})
    assert withdrawn["data"] == {"purged": 2}
    ok("certificate.register", {"certificate": cert1}, "ERROR", "PURGED")
    ok("certificate.register", {"certificate": certificate(c4, p2, care_giver=CG2, care_unit=CU2)}, "ERROR",
       "PURGED")
    assert stack.db.scalar("select count(*) from certificates where id = any(%s)", [c1, c3, c4]) == 0
    assert stack.db.scalar("select count(*) from certificates where id = %s", c2) == 1

    # --- events ---------------------------------------------------------------------------------------------
    wire.wait_events("certificate.purged", 3)
    wire.pump(0.5)  # anything extra would show up now
    bodies = [check_event(e) for e in wire.events]
    counts = Counter((e.routing_key, e.body.get("certificate_id") or e.body.get("certificate", {}).get("id"))
                     for e in wire.events)
    assert counts == Counter({
        ("certificate.registered", c1): 1, ("certificate.registered", c2): 1, ("certificate.registered", c3): 1,
        ("certificate.registered", c4): 1,
        ("certificate.sent", c1): 1, ("recipient.FKASSA.certificate.sent", c1): 1,
        ("certificate.archived", c1): 1, ("certificate.restored", c1): 1,
        ("certificate.revoked", c1): 1, ("recipient.FKASSA.certificate.revoked", c1): 1,
        ("certificate.revoked", c2): 1,
        ("certificate.care-copy-removed", c1): 1, ("certificate.care-copy-removed", c3): 1,
        ("certificate.purged", c4): 1, ("certificate.purged", c1): 1, ("certificate.purged", c3): 1,
        # §9: c1 read twice, listed, sent by care, revoked twice, care copy removed twice; c2 listed and revoked
        ("access.logged", c1): 8, ("access.logged", c2): 2, ("access.logged", c3): 1, ("access.logged", c4): 1,
    }), counts
    assert len({b["event_id"] for b in bodies}) == len(bodies)
    assert not any(p in e.raw.decode() or p2 in e.raw.decode() for e in wire.events
                   if e.routing_key.startswith("certificate."))
    # one certificate's events in the order they happened
    c1_order = [e.routing_key for e in wire.events if e.routing_key.startswith("certificate.")
                and e.body["certificate_id"] == c1]
    assert c1_order == ["certificate.registered", "certificate.sent", "certificate.archived", "certificate.restored",
                        "certificate.revoked", "certificate.care-copy-removed", "certificate.purged"]
    registered = wire.events_where("certificate.registered", certificate_id=c1)[0].body
    assert registered["certificate_type"] == "lisjp" and registered["care_giver_id"] == CG
    assert registered["care_unit_id"] == CU and registered["test_certificate"] is False
    assert wire.events_where("certificate.registered", certificate_id=c2)[0].body["test_certificate"] is True
    assert wire.events_where("certificate.sent", certificate_id=c1)[0].body["sent_by"] == "CITIZEN"
    assert {e.body["reason"] for e in wire.events_where("certificate.purged")} == {
        "CARE_COPY_REMOVED_WITHOUT_CONSENT", "CONSENT_WITHDRAWN"}
    assert wire.events_where("certificate.purged", certificate_id=c4)[0].body["reason"] == \
        "CARE_COPY_REMOVED_WITHOUT_CONSENT"
    assert wire.events_where("certificate.care-copy-removed", certificate_id=c3)[0].body["care_giver_id"] == CG2

    # --- what FKASSA's own queue holds: the whole certificate, then the revocation; nothing for c2 ----------
    deliveries = wire.take("recipient.FKASSA", count=2)
    assert wire.take("recipient.FKASSA", settle=0.5) == []
    assert [d.routing_key for d in deliveries] == ["recipient.FKASSA.certificate.sent",
                                                   "recipient.FKASSA.certificate.revoked"]
    delivered_sent, delivered_revoked = (check_event(d) for d in deliveries)
    assert delivered_sent["certificate"] == cert1  # whole, document included, as registered
    assert delivered_sent["recipient_id"] == "FKASSA" and delivered_sent["sent_by"] == "CITIZEN"
    assert delivered_revoked == {**delivered_revoked, "recipient_id": "FKASSA", "certificate_id": c1,
                                 "patient_id": p, "reason": "fel patient"}
    for other in ("TRANSP", "AF", "SKV", "SOS"):
        assert wire.ready(f"recipient.{other}") == 0

    # --- §9: the national log's queue holds each entry once, with the patient; the citizen reads the log ------
    logged = [check_event(m) for m in wire.take("intyg.access-log", count=12)]
    assert wire.take("intyg.access-log", settle=0.5) == []
    assert len({e["event_id"] for e in logged}) == 12 and {e["patient_id"] for e in logged} == {p, p2}
    assert {(e["person_id"], e["care_unit_id"]) for e in logged} == {(BY["accessed_by"]["person_id"], CU)}
    mine = ok("access-log.list", {"patient_id": p})["data"]  # no consent needed: it was withdrawn above
    assert len(mine["entries"]) == 11 and mine["next_page_token"] is None
    assert [e["at"] for e in mine["entries"]] == sorted((e["at"] for e in mine["entries"]), reverse=True)
    assert [(e["action"], e["certificate_id"]) for e in mine["entries"]][:3] == [
        ("REMOVE_CARE_COPY", c3), ("REMOVE_CARE_COPY", c1), ("REMOVE_CARE_COPY", c1)]
    theirs = ok("access-log.list", {"patient_id": p2})["data"]["entries"]
    assert [(e["action"], e["certificate_id"], e["care_giver_id"]) for e in theirs] == [
        ("REMOVE_CARE_COPY", c4, CG2)]  # c4 is purged: its entry remains

    # nothing above was dead-lettered; no personnummer in clear in the service's log
    for queue in ("intyg.registration", "intyg.status", "intyg.consent", "intyg.query"):
        assert wire.ready(f"{queue}.dlq") == 0, queue
    log = service.log_text()
    assert p not in log and p2 not in log and p[2:] not in log


def test_a_duplicate_delivery_gets_identical_replies_one_effect_and_one_set_of_events(launch, wire, stack):
    launch()
    p = new_patient()
    cid = new_id()
    body = {"certificate": certificate(cid, p)}

    register = f"dup-{uuid.uuid4()}"
    wire.send("certificate.register", body, message_id=register)
    wire.send("certificate.register", body, message_id=register)  # at once: maybe the same batch
    wire.pump_until(lambda: len(wire.replies[register]) >= 2, 15, "two replies")
    wire.send("certificate.register", body, message_id=register)  # later: from the inbox
    wire.pump_until(lambda: len(wire.replies[register]) >= 3, 15, "three replies")
    first = check_reply(wire, register, "OK")
    assert [r.body for r in wire.replies[register]] == [first] * 3

    wire.call("consent.set", {"patient_id": p, "given": True})
    send = f"dup-{uuid.uuid4()}"
    send_body = {"certificate_id": cid, "patient_id": p, "recipient_id": "FKASSA", "sent_by": "CITIZEN"}
    for _ in range(2):
        wire.send("certificate.send", send_body, message_id=send)
    wire.pump_until(lambda: len(wire.replies[send]) >= 2, 15, "two replies")
    first = check_reply(wire, send, "OK")
    assert [r.body for r in wire.replies[send]] == [first] * 2
    # a new message_id is a new request: already sent
    check_reply(wire, wire.send("certificate.send", send_body), "INFO", "ALREADY_SENT")

    wire.pump(1.0)
    assert stack.db.scalar("select count(*) from certificates where id = %s", cid) == 1
    assert stack.db.scalar("select count(*) from certificate_statuses where certificate_id = %s", cid) == 2
    assert Counter(e.routing_key for e in wire.events) == Counter({
        "certificate.registered": 1, "certificate.sent": 1, "recipient.FKASSA.certificate.sent": 1})
    assert len(wire.take("recipient.FKASSA")) == 1
    assert wire.ready("intyg.registration.dlq") == 0 and wire.ready("intyg.status.dlq") == 0


def test_each_invalid_message_is_answered_and_dead_lettered_with_its_reason_and_refusals_are_not(launch, wire):
    launch()
    p = new_patient()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    trace = {"traceparent": traceparent, "x-trace": "t-42", "CC": ["recipient.FKASSA"]}

    def invalid(routing_key, body, code, reason, queue, **props):
        # (through the default exchange the broker would honour the client's own CC for its own publish)
        headers = trace if props.get("exchange") != "" else {k: v for k, v in trace.items() if k != "CC"}
        mid = wire.send(routing_key, body, headers=headers, **props)
        return mid, routing_key, body, code, reason, queue, props

    cases = [
        invalid("certificate.register", b"{this is not json", "INVALID_MESSAGE", "not a JSON object",
                "intyg.registration"),
        invalid("certificate.register", b"[1, 2]", "INVALID_MESSAGE", "not a JSON object", "intyg.registration"),
        invalid("certificate.register", {"certificate": {"id": "x"}}, "INVALID_MESSAGE", "certificate.type",
                "intyg.registration"),  # wrong shape: names the missing fields
        invalid("consent.set", {"patient_id": p, "given": "yes"}, "INVALID_MESSAGE", "given", "intyg.consent"),
        invalid("consent.set", {"patient_id": p, "given": True, "sneaky": 1}, "INVALID_MESSAGE", "sneaky",
                "intyg.consent"),  # unknown field
        invalid("consent.set", {"patient_id": p, "given": True}, "INVALID_MESSAGE", "does not match routing key",
                "intyg.consent", type="consent.get"),  # `type` property other than the routing key
        invalid("consent.set", {"patient_id": p, "given": True}, "INVALID_MESSAGE", "content_type",
                "intyg.consent", content_type="text/plain"),
        invalid("consent.set", {"patient_id": "191212121213", "given": True}, "INVALID_PERSONNUMMER", "patient_id",
                "intyg.consent"),  # bad check digit
        invalid("certificate.revoke", revoke_body("x", "19121212-1212X"), "INVALID_PERSONNUMMER", "patient_id",
                "intyg.status"),
        # §9: a care message must name who accesses, with well-formed HSA ids and a name
        invalid("certificate.get-for-care", {"certificate_id": "x", "care_giver_id": CG}, "INVALID_MESSAGE",
                "accessed_by: Field required", "intyg.query"),
        invalid("certificate.get-for-care", {"certificate_id": "x", "care_giver_id": CG,
                                             "accessed_by": {**BY["accessed_by"], "person_id": "SE 1"}},
                "INVALID_MESSAGE", "accessed_by.person_id", "intyg.query"),
        invalid("certificate.remove-care-copy", {"certificate_id": "x", "care_giver_id": CG,
                                                 "accessed_by": {**BY["accessed_by"], "name": ""}},
                "INVALID_MESSAGE", "accessed_by.name", "intyg.status"),
        # straight into a service queue (default exchange), so its routing key is no message type at all
        invalid("intyg.status", {"certificate_id": "x"}, "INVALID_MESSAGE", "unknown routing key", "intyg.status",
                exchange=""),
    ]
    # missing message_id: the reply goes by correlation_id, request_id is empty
    wire.send("consent.set", {"patient_id": p, "given": True}, message_id=None, correlation_id="no-id-1",
              headers=trace)
    # a query without reply_to: nobody to answer, dead-lettered
    no_reply_to = wire.send("consent.get", {"patient_id": p}, reply=False, headers=trace)

    # an unknown routing key reaches the service through the alternate exchange (§1): answered, dead-lettered
    unknown = wire.send("certificate.explode", {"x": 1}, headers=trace)
    cases.append((unknown, "certificate.explode", {"x": 1}, "INVALID_MESSAGE", "unknown message type",
                  "intyg.unrouted", {}))

    for mid, routing_key, body, code, reason, queue, props in cases:
        reply = check_reply(wire, mid, "ERROR", code)
        assert reason in reply["message"], (reason, reply)
    no_id = wire.reply_msg("no-id-1").body
    assert (no_id["result"], no_id["code"], no_id["error_id"], no_id["request_id"]) == (
        "ERROR", "INVALID_MESSAGE", "VALIDATION_ERROR", "")
    assert "message_id" in no_id["message"]

    # business refusals are answers, not dead letters
    check_reply(wire, wire.send("certificate.list", {"patient_id": p}), "ERROR", "NO_CONSENT")
    cid = new_id()
    check_reply(wire, wire.send("certificate.register", {"certificate": certificate(cid, p)}), "OK")
    check_reply(wire, wire.send("certificate.send", {"certificate_id": cid, "patient_id": p, "recipient_id": "FKASSA",
                                                     "sent_by": "CARE", "care_giver_id": CG, **BY}), "OK")
    check_reply(wire, wire.send("certificate.send", {"certificate_id": cid, "patient_id": p, "recipient_id": "FKASSA",
                                                     "sent_by": "CARE", "care_giver_id": CG, **BY}),
                "INFO", "ALREADY_SENT")
    check_reply(wire, wire.send("certificate.get-for-care", {"certificate_id": "nope", "care_giver_id": CG, **BY}),
                "ERROR", "NOT_FOUND")

    letters = {q: wire.take(f"{q}.dlq") for q in ("intyg.registration", "intyg.status", "intyg.consent",
                                                   "intyg.query", "intyg.unrouted")}
    by_id = {(q, m.properties.message_id or m.properties.correlation_id): m for q, ms in letters.items() for m in ms}
    expected = {(c[5], c[0]) for c in cases} | {("intyg.consent", "no-id-1"), ("intyg.query", no_reply_to)}
    assert set(by_id) == expected  # exactly the invalid ones, each once

    for mid, routing_key, body, code, reason, queue, props in cases:
        letter = by_id[(queue, mid)]
        check_dead_letter(letter, code=code, routing_key=routing_key, error_contains=reason)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert letter.raw == raw  # body kept byte for byte
        kept = letter.properties
        assert kept.message_id == mid and kept.reply_to == wire.reply_queue and kept.delivery_mode == 2
        assert kept.content_type == props.get("content_type", "application/json")
        assert kept.type == props.get("type")
        assert letter.headers["traceparent"] == traceparent  # the allow-listed trace context, nothing else
        assert "x-trace" not in letter.headers and "CC" not in letter.headers
    # the client's CC header reached no recipient: all that is there is the one delivery of the send below
    delivered = wire.take("recipient.FKASSA")
    assert all(m.routing_key.startswith("recipient.FKASSA.certificate.") for m in delivered), [
        (m.exchange, m.routing_key, m.properties.message_id) for m in delivered]
    no_id_letter = by_id[("intyg.consent", "no-id-1")]
    check_dead_letter(no_id_letter, code="INVALID_MESSAGE", routing_key="consent.set", error_contains="message_id")
    assert no_id_letter.properties.message_id is None and no_id_letter.headers["traceparent"] == traceparent
    query_letter = by_id[("intyg.query", no_reply_to)]
    check_dead_letter(query_letter, code="INVALID_MESSAGE", routing_key="consent.get", error_contains="reply_to")
    assert query_letter.properties.reply_to is None
    assert no_reply_to not in wire.replies
    assert wire.events_where("certificate.registered", certificate_id=cid)

