"""Roles (CONTRACT §8) with ENFORCE_ROLES=true: three broker users (care limited to one care giver, the citizen
portal, an operator); RabbitMQ checks the `user_id` property each publisher sets, the service checks the role."""
from __future__ import annotations

import json
from collections import Counter

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

try:
    from tests.e2e.common import BY, CG, CG2, CU2, broker_users_for, certificate, check_reply, revoke_body
    from tests.e2e.harness import Wire, dlq_cli, new_id, new_patient
except ImportError:  # tests/ itself on sys.path
    from e2e.common import BY, CG, CG2, CU2, broker_users_for, certificate, check_reply, revoke_body
    from e2e.harness import Wire, dlq_cli, new_id, new_patient

pytestmark = pytest.mark.integration



def test_roles_forbid_what_a_broker_user_may_not_send_and_allow_the_rest(launch, wire, stack, broker_users):
    users, urls = broker_users_for(broker_users, stack, "e2e", ("care", "portal", "operator"))
    launch(ENFORCE_ROLES="true", ROLES={users["care"]: {"role": "care", "care_giver_ids": [CG]},
                                        users["portal"]: {"role": "citizen-portal"},
                                        users["operator"]: {"role": "operator"}})
    care, portal, operator = (Wire(urls[r], tap_events=False) for r in ("care", "portal", "operator"))
    try:
        def as_(who, routing_key, body, result="OK", code=None, **props):
            w = {"care": care, "portal": portal, "operator": operator}[who]
            mid = w.send(routing_key, body, user_id=users[who], **props)
            return check_reply(w, mid, result, code)

        p = new_patient()
        cid = new_id()
        # care may not set a citizen's consent; nothing changes
        forbidden = as_("care", "consent.set", {"patient_id": p, "given": True}, "ERROR", "FORBIDDEN")
        assert forbidden["data"] is None
        assert as_("operator", "consent.get", {"patient_id": p})["data"]["given"] is False
        # the citizen portal may not register; care may not register for another care giver
        as_("portal", "certificate.register", {"certificate": certificate(cid, p)}, "ERROR", "FORBIDDEN")
        other = new_id()
        as_("care", "certificate.register", {"certificate": certificate(other, p, care_giver=CG2, care_unit=CU2)},
            "ERROR", "FORBIDDEN")
        as_("care", "certificate.get-for-care", {"certificate_id": cid, "care_giver_id": CG2, **BY},
            "ERROR", "FORBIDDEN")
        assert stack.db.scalar("select count(*) from certificates") == 0
        assert stack.db.scalar("select count(*) from consents") == 0

        # what each role may do works
        as_("care", "certificate.register", {"certificate": certificate(cid, p)})
        as_("portal", "consent.set", {"patient_id": p, "given": True})
        as_("portal", "certificate.send", {"certificate_id": cid, "patient_id": p, "recipient_id": "FKASSA",
                                           "sent_by": "CARE", "care_giver_id": CG, **BY}, "ERROR", "FORBIDDEN")
        as_("portal", "certificate.send", {"certificate_id": cid, "patient_id": p, "recipient_id": "FKASSA",
                                           "sent_by": "CITIZEN"})
        as_("care", "certificate.get-for-care", {"certificate_id": cid, "care_giver_id": CG, **BY})
        as_("portal", "certificate.get", {"certificate_id": cid, "patient_id": p})
        as_("operator", "certificate.get-for-care", {"certificate_id": cid, "care_giver_id": CG, **BY})
        as_("operator", "certificate.register", {"certificate": certificate(other, p, care_giver=CG2, care_unit=CU2)})
        # §9: the citizen portal reads who accessed, and operators may; care never reads the log
        as_("care", "access-log.list", {"patient_id": p}, "ERROR", "FORBIDDEN")
        entries = as_("portal", "access-log.list", {"patient_id": p})["data"]["entries"]
        assert [(e["action"], e["certificate_id"]) for e in entries] == [("READ", cid), ("READ", cid)]
        assert len(as_("operator", "access-log.list", {"patient_id": p})["data"]["entries"]) == 2

        # FORBIDDEN is not remembered: the same message_id from an entitled sender applies
        shared = f"shared-{new_id()}"
        care.send("certificate.set-status", {"certificate_id": cid, "patient_id": p, "status": "ARCHIVED"},
                  message_id=shared, user_id=users["care"])
        check_reply(care, shared, "ERROR", "FORBIDDEN")
        portal.send("certificate.set-status", {"certificate_id": cid, "patient_id": p, "status": "ARCHIVED"},
                    message_id=shared, user_id=users["portal"])
        check_reply(portal, shared, "OK")

        # a care revoke that waits for its register: its retry copies still speak for care (NOT_FOUND, not
        # FORBIDDEN), and its dead letter names the sender in x-intyg-original-user-id
        late = new_id()
        waiting = care.send("certificate.revoke", revoke_body(late, p), user_id=users["care"])
        check_reply(care, waiting, "ERROR", "NOT_FOUND", timeout=15)
        [letter] = wire.take("intyg.status.dlq", count=1, timeout=10)
        assert letter.properties.message_id == waiting and letter.properties.user_id is None
        assert letter.headers["x-intyg-original-user-id"] == users["care"]

        # no user_id: no role (the broker only checks a user_id that is present)
        check_reply(care, care.send("certificate.get-for-care", {"certificate_id": cid, "care_giver_id": CG, **BY}),
                    "ERROR", "FORBIDDEN")
        # another user's user_id: RabbitMQ refuses the publish and closes the channel
        with pytest.raises(ChannelClosedByBroker) as refused:
            care.send("consent.set", {"patient_id": p, "given": False}, user_id=users["operator"])
        assert refused.value.reply_code == 406
    finally:
        for w in (care, portal, operator):
            w.close()

    wire.wait_events("certificate.archived", certificate_id=cid)
    wire.pump(0.5)
    assert Counter(e.routing_key for e in wire.events) == Counter({
        "certificate.registered": 2, "certificate.sent": 1, "recipient.FKASSA.certificate.sent": 1,
        "certificate.archived": 1, "access.logged": 2})  # care's and the operator's reads
    assert stack.db.scalar("select given from consents where patient_id = %s", p) is True
    for queue in ("intyg.registration", "intyg.status", "intyg.consent", "intyg.query"):
        assert wire.ready(f"{queue}.dlq") == 0, queue  # refusals are answers, not dead letters


def test_an_operators_dlq_replay_acts_for_the_original_sender(launch, wire, stack, broker_users):
    users, urls = broker_users_for(broker_users, stack, "e2e-replay", ("care", "operator"))
    launch(ENFORCE_ROLES="true", ROLES={users["care"]: {"role": "care", "care_giver_ids": [CG]},
                                        users["operator"]: {"role": "operator"}},
           REVOKE_WAIT_S="1", RETRY_DELAYS_S="[0.3]")
    care, operator = Wire(urls["care"], tap_events=False), Wire(urls["operator"], tap_events=False)
    try:
        cid, other, p = new_id(), new_id(), new_patient()
        # a revoke by a care user of care giver CG that overtakes its register until the service gives up: a dead
        # letter as the service writes one, its sender in the signed bookkeeping
        revoke = care.send("certificate.revoke", revoke_body(cid, p), user_id=users["care"])
        check_reply(care, revoke, "ERROR", "NOT_FOUND", timeout=20)
        # ... and the certificate turns out to be care giver CG2's
        for certificate_id in (cid, other):
            check_reply(operator, operator.send("certificate.register", {"certificate": certificate(
                certificate_id, p, care_giver=CG2, care_unit=CU2)}, user_id=users["operator"]), "OK")
        # a dead letter a client made up, naming the care user in a header the service did not sign
        forged = f"forged-{new_id()}"
        wire.channel.basic_publish("", "intyg.status.dlq", json.dumps(revoke_body(other, p)).encode(),
                                   pika.BasicProperties(
                                       message_id=forged, content_type="application/json", delivery_mode=2,
                                       reply_to=care.reply_queue, headers={
                                           "x-intyg-original-user-id": users["care"],
                                           "x-intyg-original-routing-key": "certificate.revoke",
                                           "x-intyg-attempts": 5}))
        wire.pump_until(lambda: wire.ready("intyg.status.dlq") == 2, 10, "the two dead letters")
        replay = dlq_cli(urls["operator"], "replay", "intyg.status", "--all")
        assert replay.returncode == 0 and "replayed 2 of 2" in replay.stdout, replay.stdout + replay.stderr
        # the signed one acts as the care user, who may not touch CG2's certificate (not as the operator) ...
        care.pump_until(lambda: len(care.replies[revoke]) >= 2, 15, "the reply to the replayed revoke")
        assert care.replies[revoke][1].body["code"] == "NOT_FOUND"
        assert stack.db.scalar("select revoked_at is null from certificates where id = %s", cid) is True
        # ... the unsigned header is never read: the made-up one acts as the operator who replayed it
        check_reply(care, forged, "OK")
        assert stack.db.scalar("select revoked_at is not null from certificates where id = %s", other) is True
    finally:
        care.close()
        operator.close()
