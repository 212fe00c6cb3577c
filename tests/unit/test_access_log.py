"""CONTRACT §9 through the handlers: every care access leaves one entry per certificate touched, in the
transaction of the answer, published once to `intyg.access-log`; the citizen reads the log, care never does."""
from __future__ import annotations

import datetime as dt

import pytest

from consumers.pipeline import parse, process
from contracts.registry import EVENTS
from contracts.topology import ACCESS_LOGGED

from .harness import REPLY_TO, Service, code, factories, policy

PATIENT, OTHER_PATIENT = factories.PATIENT, factories.OTHER_PATIENT
CARE_GIVER, OTHER_CARE_GIVER, CARE_UNIT = factories.CARE_GIVER, factories.OTHER_CARE_GIVER, factories.CARE_UNIT
DOCTOR = factories.ACCESSED_BY["person_id"]
NURSE = {"person_id": "SE2321000016-7777", "name": "Sköterska Stina", "care_unit_id": "SE2321000016-1005"}


@pytest.fixture
def service() -> Service:
    return Service()


def entry_of(service: Service, certificate_id: str) -> dict:
    [entry] = [e for e in service.access_log().data["entries"] if e["certificate_id"] == certificate_id]
    return entry


# --- one entry per action of §9 ------------------------------------------------------------------------------------
def test_care_reading_a_certificate_logs_who_read_it_for_which_unit(service):
    service.register(id="c1")
    reply = service.send("certificate.get-for-care", {"certificate_id": "c1", "care_giver_id": CARE_GIVER,
                                                      "accessed_by": NURSE})
    assert code(reply) == "OK"
    read_at = service.now
    assert service.access_log().data["entries"] == [{
        "at": read_at.isoformat(), "action": "READ", "certificate_id": "c1",
        "certificate_type": "lisjp", "patient_id": PATIENT, "person_id": NURSE["person_id"],
        "person_name": "Sköterska Stina", "care_unit_id": NURSE["care_unit_id"], "care_giver_id": CARE_GIVER}]


def test_care_listing_logs_each_certificate_it_returned_and_nothing_for_an_empty_list(service):
    for n in range(3):
        service.register(id=f"c{n}", signed_at=f"2026-11-0{n + 1}T10:00:00+01:00")
    service.register(id="other", patient_id=OTHER_PATIENT)
    first = service.list_for_care(page_size=2)
    assert [c["id"] for c in first.data["certificates"]] == ["c2", "c1"]
    assert service.logged() == [("LIST", "c1", DOCTOR), ("LIST", "c2", DOCTOR)]  # not c0, the look-ahead row
    service.list_for_care(page_size=2, page_token=first.data["next_page_token"])
    assert sorted(service.logged()) == [("LIST", "c0", DOCTOR), ("LIST", "c1", DOCTOR), ("LIST", "c2", DOCTOR)]
    assert code(service.list_for_care(care_giver_id=OTHER_CARE_GIVER)) == "OK"  # returns nothing: logs nothing
    assert code(service.list_for_care(patient_id=factories.THIRD_PATIENT)) == "OK"
    assert len(service.logged()) == 3


def test_revoke_logs_the_access_also_when_it_was_already_revoked(service):
    service.register(id="c1")
    assert code(service.revoke("c1")) == "OK"
    assert code(service.revoke("c1")) == "ALREADY_REVOKED"  # the answer still tells care about the certificate
    assert service.logged() == [("REVOKE", "c1", DOCTOR)] * 2


def test_remove_care_copy_logs_the_access_and_the_entry_outlives_the_purge(service):
    service.register(id="c1")
    assert service.remove_care_copy("c1").data == {"outcome": "PURGED"}
    assert "c1" not in service.uow.state.certificates and "c1" in service.uow.state.tombstones
    entry = entry_of(service, "c1")
    assert (entry["action"], entry["patient_id"], entry["certificate_type"]) == ("REMOVE_CARE_COPY", PATIENT, "lisjp")


def test_a_care_giver_leaving_logs_each_certificate_in_every_batch():
    service = Service(policy=policy(bulk_batch_size=2))
    service.consent(PATIENT)
    for n in range(5):
        service.register(id=f"c{n}")
    assert service.remove_care_copies(CARE_GIVER).data == {"citizen_only": 5, "purged": 0}
    assert service.calls == 3
    assert sorted(service.logged()) == [("REMOVE_CARE_COPY", f"c{n}", DOCTOR) for n in range(5)]


def test_send_by_care_logs_the_access_and_a_citizens_own_send_does_not(service):
    service.consent(PATIENT)
    service.register(id="c1")
    service.register(id="c2")
    assert code(service.send_to("c1", sent_by="CARE", care_giver_id=CARE_GIVER)) == "OK"
    assert code(service.send_to("c2")) == "OK"  # the citizen
    assert service.logged() == [("SEND", "c1", DOCTOR)]


def test_a_refusal_that_tells_care_something_is_logged_and_not_found_is_not(service):
    service.register(id="c1")
    service.revoke("c1")
    assert code(service.send_to("c1", sent_by="CARE", care_giver_id=CARE_GIVER)) == "REVOKED"
    assert code(service.send_to("c1", sent_by="CARE", care_giver_id=OTHER_CARE_GIVER)) == "NOT_FOUND"
    assert code(service.get_for_care("c1", OTHER_CARE_GIVER)) == "NOT_FOUND"
    assert code(service.get_for_care("nothing")) == "NOT_FOUND"
    assert code(service.revoke("c1", patient_id=OTHER_PATIENT)) == "NOT_FOUND"
    assert code(service.remove_care_copy("c1", OTHER_CARE_GIVER)) == "NOT_FOUND"
    assert service.logged() == [("REVOKE", "c1", DOCTOR), ("SEND", "c1", DOCTOR)]


# --- once, in the transaction of the answer, published once ------------------------------------------------------
def test_each_entry_is_published_once_to_the_access_log_queue_with_the_patient(service):
    service.register(id="c1")
    envelope = service.envelope("certificate.get-for-care", {"certificate_id": "c1", "care_giver_id": CARE_GIVER,
                                                             "accessed_by": factories.ACCESSED_BY})
    service.deliver(envelope)
    service.deliver(envelope)  # a redelivered query (queries are not kept in the inbox)
    assert service.logged() == [("READ", "c1", DOCTOR)]
    [published] = [m for m in service.uow.state.outbox if m.routing_key == ACCESS_LOGGED]
    body = EVENTS[ACCESS_LOGGED].model_validate_json(published.body)
    assert (published.kind, published.exchange, published.message_id) == ("event", "intyg.events", body.event_id)
    assert (body.type, body.action, body.certificate_id, body.patient_id, body.person_id, body.care_unit_id) == (
        ACCESS_LOGGED, "READ", "c1", PATIENT, DOCTOR, CARE_UNIT)


def test_an_entry_and_the_answer_are_committed_together_or_not_at_all(service):
    service.register(id="c1")
    parsed = parse(service.envelope("certificate.revoke", {**CARE_MESSAGES["certificate.revoke"],
                                                           "accessed_by": factories.ACCESSED_BY}), service.policy)
    with service.uow:
        assert code(process(parsed, service.uow, service.policy, service.now).reply) == "OK"
        state = service.uow.state
        assert service.logged() == [("REVOKE", "c1", DOCTOR)]
        assert [m.routing_key for m in state.outbox[-2:]] == [ACCESS_LOGGED, "certificate.revoked"]
    # not committed (a crash before the commit): neither the answer (the inbox keeps it) nor its entry
    assert service.logged() == [] and parsed.message_id not in service.uow.state.inbox
    assert service.uow.state.certificates["c1"].revoked_at is None


# --- bad input: nothing logged, nothing read --------------------------------------------------------------------
CARE_MESSAGES = {
    "certificate.get-for-care": {"certificate_id": "c1", "care_giver_id": CARE_GIVER},
    "certificate.list-for-care": {"patient_id": PATIENT, "care_giver_id": CARE_GIVER, "care_unit_ids": [CARE_UNIT]},
    "certificate.revoke": {"certificate_id": "c1", "patient_id": PATIENT,
                           "revoked_by": {"person_id": DOCTOR, "name": "Ajla"}},
    "certificate.remove-care-copy": {"certificate_id": "c1", "care_giver_id": CARE_GIVER},
    "care-giver.remove-care-copies": {"care_giver_id": CARE_GIVER},
    "certificate.send": {"certificate_id": "c1", "patient_id": PATIENT, "recipient_id": "FKASSA", "sent_by": "CARE",
                         "care_giver_id": CARE_GIVER},
}


def _untouched(service: Service) -> None:
    assert service.logged() == [] and service.uow.state.certificates["c1"].statuses[-1].status == "RECEIVED"
    assert service.uow.state.certificates["c1"].available_to_care


@pytest.mark.parametrize("routing_key", sorted(CARE_MESSAGES))
def test_a_care_message_without_accessed_by_is_invalid_naming_the_field(service, routing_key):
    service.register(id="c1")
    reply = service.send(routing_key, CARE_MESSAGES[routing_key])
    assert (code(reply), reply.message) == ("INVALID_MESSAGE", "accessed_by: Field required")
    _untouched(service)


@pytest.mark.parametrize("accessed_by, field", [
    ({**factories.ACCESSED_BY, "person_id": "SE 1003"}, "accessed_by.person_id"),
    ({**factories.ACCESSED_BY, "person_id": ""}, "accessed_by.person_id"),
    ({**factories.ACCESSED_BY, "person_id": "S" * 65}, "accessed_by.person_id"),
    ({**factories.ACCESSED_BY, "care_unit_id": "SE\t1004"}, "accessed_by.care_unit_id"),
    ({**factories.ACCESSED_BY, "name": ""}, "accessed_by.name"),
    ({**factories.ACCESSED_BY, "name": "   "}, "accessed_by.name"),
    ({"person_id": DOCTOR, "name": "Ajla"}, "accessed_by.care_unit_id"),
])
@pytest.mark.parametrize("routing_key", sorted(CARE_MESSAGES))
def test_a_malformed_accessed_by_is_invalid_naming_the_field(service, routing_key, accessed_by, field):
    service.register(id="c1")
    reply = service.send(routing_key, {**CARE_MESSAGES[routing_key], "accessed_by": accessed_by})
    assert code(reply) == "INVALID_MESSAGE" and reply.message.startswith(f"{field}: ")
    _untouched(service)


def test_a_citizens_send_names_no_care_reader(service):
    service.consent(PATIENT)
    service.register(id="c1")
    body = {**CARE_MESSAGES["certificate.send"], "sent_by": "CITIZEN", "accessed_by": factories.ACCESSED_BY}
    assert code(service.send("certificate.send", body)) == "INVALID_MESSAGE"
    _untouched(service)


def test_with_the_log_not_required_a_v1_care_message_is_still_logged_for_its_care_giver():
    service = Service(policy=policy(access_log_required=False))
    service.register(id="c1")
    assert code(service.send("certificate.get-for-care", CARE_MESSAGES["certificate.get-for-care"])) == "OK"
    entry = entry_of(service, "c1")
    assert (entry["care_giver_id"], entry["person_id"], entry["person_name"], entry["care_unit_id"]) == (
        CARE_GIVER, None, None, None)


# --- access-log.list --------------------------------------------------------------------------------------------
ROLES = {"webcert": ("care", None), "portal": ("citizen-portal", None), "ops": ("operator", None)}


def test_only_the_citizen_portal_and_operators_read_the_log_never_care():
    service = Service(policy=policy(enforce_roles=True, roles=ROLES))
    assert code(service.access_log(user_id="webcert")) == "FORBIDDEN"
    assert code(service.access_log(user_id="portal")) == "OK"
    assert code(service.access_log(user_id="ops")) == "OK"


def test_the_patient_reads_the_log_without_consent_newest_first_in_pages_by_swedish_day(service):
    for n in range(3):
        service.register(id=f"c{n}")
    service.register(id="theirs", patient_id=OTHER_PATIENT)
    service.now = dt.datetime(2026, 11, 30, 23, 30, tzinfo=dt.UTC)  # 1 December 00:30 in Stockholm
    for n in range(3):
        service.get_for_care(f"c{n}")
    service.get_for_care("theirs")
    assert not service.uow.consents.get(PATIENT).given
    first = service.access_log(page_size=2)
    assert [e["certificate_id"] for e in first.data["entries"]] == ["c2", "c1"]
    rest = service.access_log(page_size=2, page_token=first.data["next_page_token"])
    assert [e["certificate_id"] for e in rest.data["entries"]] == ["c0"] and rest.data["next_page_token"] is None
    december = {"from": "2026-12-01", "to": "2026-12-01"}
    assert [e["certificate_id"] for e in service.access_log(**december).data["entries"]] == ["c2", "c1", "c0"]
    assert service.access_log(**{"to": "2026-11-30"}).data["entries"] == []
    assert service.access_log(**{"from": "2026-12-02"}).data["entries"] == []


def test_a_page_token_the_service_never_gave_out_is_invalid(service):
    assert code(service.access_log(page_token="not-a-token")) == "INVALID_MESSAGE"
