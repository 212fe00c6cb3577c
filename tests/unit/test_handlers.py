"""The seed's rules through the handlers: an envelope is parsed, processed in a (fake) transaction and committed;
the reply, the events in the outbox and the inbox are what the world sees."""
from __future__ import annotations

import base64
import gc
import json
import re

import pytest

from consumers.pipeline import RetryLater
from contracts.registry import EVENTS
from contracts.topology import ACCESS_LOGGED
from domain.model import Catalogue, Recipient

from .harness import CATALOGUE, REPLY_TO, Service, code, factories, policy

PATIENT, OTHER_PATIENT = factories.PATIENT, factories.OTHER_PATIENT
CARE_GIVER, OTHER_CARE_GIVER, CARE_UNIT = factories.CARE_GIVER, factories.OTHER_CARE_GIVER, factories.CARE_UNIT
BY = {"accessed_by": factories.ACCESSED_BY}


@pytest.fixture
def service() -> Service:
    return Service()


def keys(events) -> list[str]:
    return [key for key, _ in events]


def assert_valid_events(service: Service) -> None:
    """Every event matches its contract model; broadcasts name no patient and carry no document."""
    for message in service.uow.state.outbox:
        if message.kind != "event":
            continue
        body = json.loads(message.body)
        assert message.message_id == body["event_id"] and body["type"] == message.routing_key
        if message.routing_key.startswith("recipient."):
            recipient, what = re.fullmatch(r"recipient\.([^.]+)\.certificate\.(sent|revoked)",
                                           message.routing_key).groups()
            assert body["recipient_id"] == recipient
            EVENTS[f"recipient.{{recipient_id}}.certificate.{what}"].model_validate(body)
        elif message.routing_key == ACCESS_LOGGED:  # not a broadcast: only for the national log's queue
            EVENTS[ACCESS_LOGGED].model_validate(body)
            assert "document" not in body and "certificate" not in body
        else:
            EVENTS[message.routing_key].model_validate(body)
            assert "patient_id" not in body and "document" not in body and "certificate" not in body
            for patient in (PATIENT, OTHER_PATIENT, factories.THIRD_PATIENT):
                assert patient not in message.body.decode()


# --- slide 2: register ------------------------------------------------------------------------------------------
def test_register_stores_a_copy_available_to_care_and_to_the_citizen(service):
    reply = service.register(id="c1")
    assert (reply.result.value, reply.error_id, reply.code, reply.data) == ("OK", None, None, None)
    assert keys(service.events()) == ["certificate.registered"]
    registered = service.events()[0][1]
    assert (registered["certificate_id"], registered["certificate_type"], registered["care_giver_id"],
            registered["care_unit_id"], registered["test_certificate"]) == ("c1", "lisjp", CARE_GIVER, CARE_UNIT,
                                                                             False)
    service.consent(PATIENT)
    mine = service.get("c1").data
    assert mine["document"] == factories.certificate_json()["document"]  # byte for byte
    assert (mine["archived"], mine["available_to_care"], mine["revoked"], mine["sent_to"]) == (False, True, False, [])
    assert [s["status"] for s in mine["statuses"]] == ["RECEIVED"]
    assert service.get_for_care("c1").data["document"] == factories.certificate_json()["document"]
    assert_valid_events(service)


def test_register_same_content_is_already_exists(service):
    service.register(id="c1")
    service.new_events()
    dashed = factories.certificate_json(id="c1", patient_id="19121212-1212")
    reply = service.send("certificate.register", {"certificate": dashed})
    assert (reply.result.value, reply.code.value) == ("INFO", "ALREADY_EXISTS")
    assert service.new_events() == []


def test_register_other_patient_is_conflict(service):
    service.register(id="c1")
    reply = service.register(id="c1", patient_id=OTHER_PATIENT)
    assert (reply.result.value, reply.error_id.value, reply.code.value) == ("ERROR", "VALIDATION_ERROR", "CONFLICT")
    service.consent(PATIENT)
    assert service.get("c1").data["patient_id"] == PATIENT


def test_register_other_content_is_conflict(service):
    service.register(id="c1")
    assert code(service.register(id="c1", valid_to="2026-12-31")) == "CONFLICT"


def test_same_message_id_is_applied_once_and_answered_the_same(service):
    envelope = service.envelope("certificate.register", {"certificate": factories.certificate_json()},
                                message_id="once")
    first = service.deliver(envelope)
    events = service.new_events()
    again = service.deliver(envelope)
    assert again == first and service.new_events() == []
    assert service.uow.state.inbox["once"] == {"message_type": "certificate.register",
                                               "reply": first.model_dump(mode="json")}
    assert len(events) == 1
    assert service.replies[-2:] == [(REPLY_TO, "once", first)] * 2  # no correlation_id: the message_id


def test_a_refusal_is_remembered_too(service):
    envelope = service.envelope("certificate.get", {"certificate_id": "x", "patient_id": PATIENT})
    assert code(service.deliver(envelope)) == "NO_CONSENT"  # queries are not remembered ...
    assert envelope.message_id not in service.uow.state.inbox
    command = service.envelope("certificate.set-status", {"certificate_id": "x", "patient_id": PATIENT,
                                                          "status": "ARCHIVED"})
    assert code(service.deliver(command)) == "NO_CONSENT"  # ... commands are, refusals included
    assert service.uow.state.inbox[command.message_id]["reply"]["code"] == "NO_CONSENT"


def test_correlation_id_is_copied_to_the_reply(service):
    service.deliver(service.envelope("consent.set", {"patient_id": PATIENT, "given": True},
                                     correlation_id="corr-1"))
    assert service.replies[-1][1] == "corr-1"


def test_a_command_without_reply_to_is_applied_without_a_reply(service):
    service.send("consent.set", {"patient_id": PATIENT, "given": True}, reply_to=None)
    assert [m.kind for m in service.uow.state.outbox] == []
    assert service.send("consent.get", {"patient_id": PATIENT}).data["given"] is True


# --- slide 4-5: citizen and care access ---------------------------------------------------------------------------
def test_citizen_lists_newest_first_with_filters_and_pages(service):
    service.consent(PATIENT)
    service.register(id="old", signed_at="2026-01-05T10:00:00+01:00")
    service.register(id="mid", type="luse", signed_at="2026-02-05T10:00:00+01:00")
    service.register(id="new", signed_at="2026-03-05T10:00:00+01:00")
    service.register(id="theirs", patient_id=OTHER_PATIENT)
    service.revoke("mid")
    assert service.citizen_ids() == ["new", "mid", "old"]  # revoked ones included
    assert service.citizen_ids(types=["luse"]) == ["mid"]
    assert service.citizen_ids(signed_from="2026-02-01", signed_to="2026-03-05") == ["new", "mid"]
    first = service.list(page_size=2).data
    assert [c["id"] for c in first["certificates"]] == ["new", "mid"]
    assert all("document" not in c for c in first["certificates"])
    second = service.list(page_size=2, page_token=first["next_page_token"]).data
    assert ([c["id"] for c in second["certificates"]], second["next_page_token"]) == (["old"], None)


def test_a_page_token_not_given_out_is_invalid(service):
    service.consent(PATIENT)
    reply = service.list(page_token="not-a-token")
    assert (reply.error_id.value, reply.code.value) == ("VALIDATION_ERROR", "INVALID_MESSAGE")


@pytest.mark.parametrize("key", [{"s": "2026-01-01T00:00:00+00:00", "i": "a\u0000b"},
                                 {"s": "2026-01-01T00:00:00+00:00", "i": 7},
                                 {"s": "2026-01-01T00:00:00", "i": "c1"}])
def test_a_tampered_page_token_is_invalid_before_it_reaches_the_store(service, key):
    service.consent(PATIENT)
    token = base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")
    reply = service.list(page_token=token)
    assert (reply.code.value, reply.message) == ("INVALID_MESSAGE", "page_token is not a token this service gave out")


def test_care_sees_only_its_own_care_copies_of_the_named_units(service):
    service.register(id="here")
    service.register(id="other-unit", issued_by=factories.issued_by(CARE_GIVER, "SE-UNIT-2"))
    service.register(id="other-giver", issued_by=factories.issued_by(OTHER_CARE_GIVER, CARE_UNIT))
    assert service.care_ids() == ["here"]
    assert sorted(service.care_ids(care_unit_ids=(CARE_UNIT, "SE-UNIT-2"))) == ["here", "other-unit"]
    assert code(service.get_for_care("other-giver")) == "NOT_FOUND"
    assert code(service.get_for_care("other-giver", OTHER_CARE_GIVER)) == "OK"


def test_consent_is_reported(service):
    assert service.send("consent.get", {"patient_id": PATIENT}).data == {"given": False, "changed_at": None}
    service.consent(PATIENT)
    changed_at = service.now.isoformat()
    assert service.send("consent.get", {"patient_id": PATIENT}).data == {"given": True, "changed_at": changed_at}


def test_recipients_are_listed_by_type(service):
    every = service.send("recipient.list", {}).data["recipients"]
    assert {r["id"] for r in every} == {"FKASSA", "TRANSP", "AF", "SKV", "SOS"}
    assert [r["id"] for r in service.send("recipient.list", {"certificate_type": "db"}).data["recipients"]] == ["SKV"]


@pytest.mark.parametrize("kind", ["db", "doi"])
def test_death_certificates_are_never_shown_to_the_citizen(service, kind):
    authority = "SKV" if kind == "db" else "SOS"
    service.consent(PATIENT)
    service.register(id="death", type=kind)
    assert service.citizen_ids() == [] and service.citizen_ids(archived=True) == []
    assert service.citizen_ids(types=[kind]) == []
    assert code(service.get("death")) == "NOT_FOUND"
    assert code(service.set_status("death", PATIENT, "ARCHIVED")) == "NOT_FOUND"
    assert code(service.send_to("death", authority)) == "NOT_FOUND"
    assert code(service.get_for_care("death")) == "OK"
    assert code(service.send_to("death", authority, sent_by="CARE", care_giver_id=CARE_GIVER)) == "OK"


def test_care_never_sees_archive_statuses(service):
    service.consent(PATIENT)
    service.register(id="c1")
    service.set_status("c1", PATIENT, "ARCHIVED")
    service.set_status("c1", PATIENT, "RESTORED")
    service.send_to("c1")
    care = service.get_for_care("c1").data
    assert [s["status"] for s in care["statuses"]] == ["RECEIVED", "SENT"]
    assert "archived" not in care and "available_to_care" not in care
    listed = service.list_for_care().data["certificates"][0]
    assert [s["status"] for s in listed["statuses"]] == ["RECEIVED", "SENT"] and "archived" not in listed
    assert [s["status"] for s in service.get("c1").data["statuses"]] == ["RECEIVED", "ARCHIVED", "RESTORED", "SENT"]


# --- slide 6: archive -----------------------------------------------------------------------------------------
def test_archived_certificate_stays_available_to_care(service):
    service.consent(PATIENT)
    service.register(id="c1")
    service.new_events()
    assert code(service.set_status("c1", PATIENT, "ARCHIVED")) == "OK"
    assert keys(service.new_events()) == ["certificate.archived"]
    assert service.citizen_ids() == [] and service.citizen_ids(archived=True) == ["c1"]
    assert service.get("c1").data["archived"] is True
    assert service.care_ids() == ["c1"] and code(service.get_for_care("c1")) == "OK"
    assert code(service.set_status("c1", PATIENT, "ARCHIVED")) == "NO_CHANGE"
    assert code(service.set_status("c1", PATIENT, "RESTORED")) == "OK"
    assert keys(service.new_events()) == ["certificate.restored"]
    assert service.citizen_ids() == ["c1"]


# --- slide 7-8: care removes its copy -------------------------------------------------------------------------
def test_care_removal_with_consent_keeps_it_for_the_citizen(service):
    service.consent(PATIENT)
    service.register(id="c1")
    service.new_events()
    reply = service.remove_care_copy("c1")
    assert (code(reply), reply.data) == ("OK", {"outcome": "CITIZEN_ONLY"})
    [(key, removed)] = service.new_events()
    assert (key, removed["certificate_id"], removed["care_giver_id"]) == ("certificate.care-copy-removed", "c1",
                                                                         CARE_GIVER)
    mine = service.get("c1").data
    assert (mine["available_to_care"], mine["statuses"][-1]["status"]) == (False, "CARE_COPY_REMOVED")
    assert service.citizen_ids() == ["c1"]
    assert code(service.get_for_care("c1")) == "NOT_FOUND" and service.care_ids() == []
    again = service.remove_care_copy("c1")
    assert (code(again), again.data) == ("NO_CHANGE", {"outcome": "CITIZEN_ONLY"})


def test_care_removal_without_consent_purges(service):
    service.register(id="c1")
    service.new_events()
    reply = service.remove_care_copy("c1")
    assert (code(reply), reply.data) == ("OK", {"outcome": "PURGED"})
    [(key, purged)] = service.new_events()
    assert (key, purged["certificate_id"], purged["reason"]) == (
        "certificate.purged", "c1", "CARE_COPY_REMOVED_WITHOUT_CONSENT")
    assert "c1" not in service.uow.state.certificates and "c1" not in service.uow.state.documents
    assert code(service.get_for_care("c1")) == "NOT_FOUND"
    service.consent(PATIENT)
    assert code(service.get("c1")) == "NOT_FOUND" and service.citizen_ids() == []
    assert code(service.remove_care_copy("c1")) == "NOT_FOUND"


def test_only_the_certificates_own_care_giver_removes_its_copy(service):
    service.register(id="c1")
    assert code(service.remove_care_copy("c1", OTHER_CARE_GIVER)) == "NOT_FOUND"
    assert code(service.get_for_care("c1")) == "OK"


# --- slide 9-10: consent withdrawn --------------------------------------------------------------------------------
def test_consent_withdrawn_hides_everything_from_the_citizen_but_keeps_care_copies(service):
    service.consent(PATIENT)
    service.register(id="c1")
    service.register(id="c2")
    service.set_status("c2", PATIENT, "ARCHIVED")
    reply = service.consent(PATIENT, False)
    assert (code(reply), reply.data) == ("OK", {"purged": 0})
    assert code(service.list()) == "NO_CONSENT" and code(service.list(archived=True)) == "NO_CONSENT"
    assert code(service.get("c1")) == "NO_CONSENT"
    assert code(service.send_to("c1")) == "NO_CONSENT"
    assert code(service.set_status("c2", PATIENT, "RESTORED")) == "NO_CONSENT"
    assert sorted(service.care_ids()) == ["c1", "c2"]
    assert code(service.send_to("c1", sent_by="CARE", care_giver_id=CARE_GIVER)) == "OK"  # care needs no consent
    service.consent(PATIENT)
    assert service.citizen_ids() == ["c1"] and service.citizen_ids(archived=True) == ["c2"]


def test_consent_withdrawn_purges_certificates_without_care_copy(service):
    service.consent(PATIENT)
    service.consent(OTHER_PATIENT)
    for cid in ("a", "b", "kept"):
        service.register(id=cid)
    service.register(id="theirs", patient_id=OTHER_PATIENT)
    service.remove_care_copy("a")
    service.remove_care_copy("b")
    service.remove_care_copy("theirs")
    service.new_events()
    reply = service.consent(PATIENT, False)
    assert (code(reply), reply.data) == ("OK", {"purged": 2})
    events = service.new_events()
    assert [(k, e["certificate_id"], e["reason"]) for k, e in events] == [
        ("certificate.purged", "a", "CONSENT_WITHDRAWN"), ("certificate.purged", "b", "CONSENT_WITHDRAWN")]
    assert set(service.uow.state.certificates) == {"kept", "theirs"}
    assert service.care_ids() == ["kept"]
    assert code(service.consent(PATIENT, False)) == "NO_CHANGE"
    service.consent(PATIENT)
    assert service.citizen_ids() == ["kept"]
    assert code(service.get("a")) == "NOT_FOUND"
    assert service.citizen_ids(OTHER_PATIENT) == ["theirs"]  # another patient's consent is untouched


def test_purged_id_is_never_registered_again(service):
    service.register(id="c1")
    service.remove_care_copy("c1")
    service.new_events()
    for _ in range(2):
        reply = service.register(id="c1")
        assert (reply.error_id.value, reply.code.value) == ("APPLICATION_ERROR", "PURGED")
    service.consent(PATIENT)
    assert code(service.register(id="c1")) == "PURGED"
    assert service.new_events() == [] and "c1" not in service.uow.state.certificates
    assert code(service.get("c1")) == "NOT_FOUND"


# --- a care giver leaves ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 100])
def test_care_giver_leaving_applies_the_rule_to_each_certificate(batch):
    service = Service(policy=policy(bulk_batch_size=batch))
    service.consent(PATIENT)
    for n in range(3):
        service.register(id=f"consented-{n}")
    for n in range(2):
        service.register(id=f"unconsented-{n}", patient_id=OTHER_PATIENT)
    service.register(id="other-giver", issued_by=factories.issued_by(OTHER_CARE_GIVER, CARE_UNIT))
    service.remove_care_copy("consented-0")  # already citizen-only: not counted again
    service.new_events()

    reply = service.remove_care_copies(CARE_GIVER)
    assert (code(reply), reply.data) == ("OK", {"citizen_only": 2, "purged": 2})
    assert service.calls == 4 // batch + 1  # batches until one comes back short
    events = service.new_events()
    assert sorted((k, e["certificate_id"]) for k, e in events) == [
        ("certificate.care-copy-removed", "consented-1"), ("certificate.care-copy-removed", "consented-2"),
        ("certificate.purged", "unconsented-0"), ("certificate.purged", "unconsented-1")]
    assert set(service.uow.state.certificates) == {"consented-0", "consented-1", "consented-2", "other-giver"}
    assert sorted(service.citizen_ids()) == ["consented-0", "consented-1", "consented-2", "other-giver"]
    assert service.care_ids() == [] and code(service.get_for_care("other-giver", OTHER_CARE_GIVER)) == "OK"
    assert_valid_events(service)
    again = service.remove_care_copies(CARE_GIVER)
    assert (code(again), again.data) == ("OK", {"citizen_only": 0, "purged": 0})


def test_care_giver_leaving_redelivered_is_answered_from_the_inbox():
    service = Service(policy=policy(bulk_batch_size=2))
    for n in range(5):
        service.register(id=f"c{n}")
    envelope = service.envelope("care-giver.remove-care-copies", {"care_giver_id": CARE_GIVER, **BY},
                                message_id="leave")
    first = service.deliver(envelope)
    assert first.data == {"citizen_only": 0, "purged": 5} and service.calls == 3
    assert service.deliver(envelope) == first and service.calls == 1


# --- send and revoke --------------------------------------------------------------------------------------------
def test_send_delivers_the_whole_certificate_to_the_recipient(service):
    service.consent(PATIENT)
    service.register(id="c1")
    service.new_events()
    assert code(service.send_to("c1")) == "OK"
    [(broadcast, sent), (delivery, body)] = service.new_events()
    assert (broadcast, sent["recipient_id"], sent["sent_by"]) == ("certificate.sent", "FKASSA", "CITIZEN")
    assert delivery == "recipient.FKASSA.certificate.sent"
    assert body["certificate"] == factories.certificate_json(id="c1")  # document included, byte for byte
    assert service.get("c1").data["sent_to"] == ["FKASSA"]
    assert code(service.send_to("c1")) == "ALREADY_SENT" and service.new_events() == []
    assert_valid_events(service)


def test_revoke_tells_each_recipient_it_was_sent_to_and_no_other():
    catalogue = Catalogue(CATALOGUE.certificate_types, {
        **CATALOGUE.recipients, "FORS": Recipient("FORS", "Försäkringsbolag", frozenset({"lisjp"}))})
    service = Service(policy=policy(catalogue=catalogue))
    service.consent(PATIENT)
    service.register(id="c1")
    service.send_to("c1", "FKASSA")
    service.send_to("c1", "FORS", sent_by="CARE", care_giver_id=CARE_GIVER)
    service.new_events()
    assert code(service.revoke("c1", reason="fel patient")) == "OK"
    events = service.new_events()
    assert keys(events) == ["certificate.revoked", "recipient.FKASSA.certificate.revoked",
                            "recipient.FORS.certificate.revoked"]
    assert all((e["certificate_id"], e.get("patient_id", PATIENT)) == ("c1", PATIENT) for _, e in events)
    assert [e["reason"] for _, e in events[1:]] == ["fel patient"] * 2
    mine = service.get("c1").data
    assert mine["revoked"] and mine["revoked_at"] and mine["statuses"][-1]["status"] == "REVOKED"
    assert code(service.revoke("c1")) == "ALREADY_REVOKED" and service.new_events() == []
    assert code(service.send_to("c1", "FKASSA")) == "REVOKED"
    assert_valid_events(service)


def test_test_certificates_produce_no_recipient_deliveries(service):
    service.consent(PATIENT)
    service.register(id="t1", test_certificate=True)
    assert code(service.send_to("t1")) == "TEST_CERTIFICATE"
    assert code(service.revoke("t1")) == "OK"
    assert [k for k in keys(service.events()) if k.startswith("recipient.")] == []
    assert service.events()[0][1]["test_certificate"] is True


def test_revoke_overtaking_its_register_is_retried_and_leaves_no_trace(service):
    envelope = service.envelope("certificate.revoke", {"certificate_id": "early", "patient_id": PATIENT,
                                                       "revoked_by": {"person_id": "SE-1", "name": "A"}, **BY})
    with pytest.raises(RetryLater) as raised:
        service.deliver(envelope)
    assert (raised.value.reply.code.value, raised.value.reply.error_id.value) == ("NOT_FOUND", "APPLICATION_ERROR")
    assert envelope.message_id not in service.uow.state.inbox and service.uow.state.outbox == []
    service.register(id="early")
    assert code(service.deliver(envelope)) == "OK"


def test_revoke_of_a_purged_certificate_is_not_found_at_once(service):
    service.register(id="c1")
    service.remove_care_copy("c1")
    assert code(service.revoke("c1")) == "NOT_FOUND"


def test_revoke_for_another_patient_is_not_found(service):
    service.register(id="c1")
    assert code(service.revoke("c1", patient_id=OTHER_PATIENT)) == "NOT_FOUND"


def test_events_of_one_certificate_come_in_the_order_they_happened(service):
    service.consent(PATIENT)
    service.register(id="c1")
    service.set_status("c1", PATIENT, "ARCHIVED")
    service.send_to("c1")
    service.revoke("c1")
    service.remove_care_copy("c1")
    service.consent(PATIENT, False)
    assert keys(service.events()) == [
        "certificate.registered", "certificate.archived", "certificate.sent", "recipient.FKASSA.certificate.sent",
        "certificate.revoked", "recipient.FKASSA.certificate.revoked", "certificate.care-copy-removed",
        "certificate.purged"]
    assert_valid_events(service)


# --- roles (§8) ---------------------------------------------------------------------------------------------------
ROLES = {"webcert": ("care", None), "region": ("care", frozenset({CARE_GIVER})), "portal": ("citizen-portal", None),
         "ops": ("operator", None)}


def test_roles_decide_who_may_send_what():
    service = Service(policy=policy(enforce_roles=True, roles=ROLES))
    body = {"certificate": factories.certificate_json(id="c1")}
    assert code(service.send("certificate.register", body, user_id="portal")) == "FORBIDDEN"
    assert code(service.send("certificate.register", body, user_id="stranger")) == "FORBIDDEN"
    assert code(service.send("consent.set", {"patient_id": PATIENT, "given": True}, user_id="webcert")) == "FORBIDDEN"
    assert code(service.send("certificate.get-for-care", {"certificate_id": "c1", "care_giver_id": CARE_GIVER, **BY},
                             user_id="portal")) == "FORBIDDEN"
    assert service.uow.state.certificates == {} and service.events() == []
    assert code(service.send("certificate.register", body, user_id="webcert")) == "OK"
    assert code(service.send("consent.set", {"patient_id": PATIENT, "given": True}, user_id="portal")) == "OK"
    send = {"certificate_id": "c1", "patient_id": PATIENT, "recipient_id": "FKASSA", "sent_by": "CITIZEN",
            "care_giver_id": CARE_GIVER}
    assert code(service.send("certificate.send", {**send, "sent_by": "CARE", **BY}, user_id="portal")) == "FORBIDDEN"
    assert code(service.send("certificate.send", send, user_id="portal")) == "OK"


def test_a_care_user_limited_to_some_care_givers_acts_only_for_them():
    service = Service(policy=policy(enforce_roles=True, roles=ROLES))
    other = {"certificate": factories.certificate_json(id="c2",
                                                       issued_by=factories.issued_by(OTHER_CARE_GIVER, CARE_UNIT))}
    assert code(service.send("certificate.register", other, user_id="region")) == "FORBIDDEN"
    assert code(service.send("certificate.register", other, user_id="webcert")) == "OK"
    assert code(service.send("care-giver.remove-care-copies", {"care_giver_id": OTHER_CARE_GIVER, **BY},
                             user_id="region")) == "FORBIDDEN"
    revoke = {"certificate_id": "c2", "patient_id": PATIENT, "revoked_by": {"person_id": "SE-1", "name": "A"}, **BY}
    assert code(service.send("certificate.revoke", revoke, user_id="region")) == "NOT_FOUND"  # never reveal
    assert code(service.send("certificate.get-for-care", {"certificate_id": "c2", "care_giver_id": OTHER_CARE_GIVER,
                                                          **BY}, user_id="region")) == "FORBIDDEN"


def test_forbidden_is_not_remembered_and_a_replay_acts_as_its_sender():
    service = Service(policy=policy(enforce_roles=True, roles=ROLES))
    body = {"certificate": factories.certificate_json(id="c1")}
    envelope = service.envelope("certificate.register", body, message_id="reg-1", user_id="portal")
    assert code(service.deliver(envelope)) == "FORBIDDEN"
    assert "reg-1" not in service.uow.state.inbox
    replay = service.envelope("certificate.register", body, message_id="reg-1", user_id="ops", origin_user="portal")
    assert code(service.deliver(replay)) == "FORBIDDEN"  # a replay cannot lift the sender's role
    forged = service.envelope("certificate.register", body, message_id="reg-1", user_id="portal",
                              origin_user="ops")
    assert code(service.deliver(forged)) == "FORBIDDEN"  # only an operator's replay acts as another user
    replay = service.envelope("certificate.register", body, message_id="reg-1", user_id="ops", origin_user="webcert")
    assert code(service.deliver(replay)) == "OK"
    assert code(service.send("certificate.register", body, user_id="ops")) == "ALREADY_EXISTS"  # operators may


# --- the fake itself ----------------------------------------------------------------------------------------------
def test_the_fake_rolls_back_what_is_not_committed():
    service = Service()
    service.register(id="c1")
    with pytest.raises(RuntimeError):
        with service.uow:
            service.uow.consents.save(type(service.uow.consents.get(PATIENT))(PATIENT, True, None))
            with pytest.raises(ValueError):
                with service.uow.savepoint():
                    service.uow.inbox.add("x", "t", None)
                    raise ValueError
            assert service.uow.inbox.get("x") is None and service.uow.consents.get(PATIENT).given
            raise RuntimeError
    assert not service.uow.consents.get(PATIENT).given and "c1" in service.uow.state.certificates


def test_handled_commands_leave_nothing_for_the_cycle_collector(service):
    """An event refers to its certificate; a certificate that kept its events would be a reference cycle, freed
    (20 KB document and all) only when the cycle collector runs."""
    service.register(id="warm-up")
    gc.collect()
    gc.disable()
    try:
        service.register(id="c1")
        service.send_to("c1")
        service.revoke("c1")
        service.remove_care_copy("c1")
        assert gc.collect() == 0
    finally:
        gc.enable()
