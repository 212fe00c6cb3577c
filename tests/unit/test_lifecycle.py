"""The seed's rules (slides 2-11) on the pure domain: `domain.lifecycle` and `domain.model`, no I/O."""
from __future__ import annotations

import pytest

from domain import events, lifecycle
from domain.errors import Refused
from domain.lifecycle import Purge
from domain.model import Certificate, Consent, must_purge

from .harness import CATALOGUE, NOW, factories

PATIENT, CARE_GIVER, OTHER_CARE_GIVER = factories.PATIENT, factories.CARE_GIVER, factories.OTHER_CARE_GIVER


def given(patient_id: str = PATIENT) -> Consent:
    return Consent(patient_id, True, NOW)


def withdrawn(patient_id: str = PATIENT) -> Consent:
    return Consent(patient_id, False, None)


def registered(**fields) -> Certificate:
    certificate = factories.certificate(**fields)
    lifecycle.register(certificate, None, False, CATALOGUE, NOW)
    certificate.events.clear()
    return certificate


def refused(code: str, call, *args) -> Refused:
    with pytest.raises(Refused) as raised:
        call(*args)
    assert raised.value.code == code
    return raised.value


# --- slide 2-3: register ----------------------------------------------------------------------------------------
def test_registered_certificate_is_available_to_care_and_to_the_citizen_in_view():
    certificate = factories.certificate(available_to_care=False, archived=True)
    outcome = lifecycle.register(certificate, None, False, CATALOGUE, NOW)
    assert outcome.info is None
    assert certificate.available_to_care and not certificate.archived
    assert [s.status for s in certificate.statuses] == ["RECEIVED"]
    assert certificate.events == [events.Registered(certificate)]
    assert certificate.visible_to_care(CARE_GIVER) and certificate.visible_to_citizen(given())


def test_register_same_content_is_already_exists():
    stored = registered(id="c1")
    again = factories.certificate(id="c1")
    assert lifecycle.register(again, stored, False, CATALOGUE, NOW).info == "ALREADY_EXISTS"
    assert again.events == [] and again.statuses == []


def test_register_other_patient_is_conflict():
    stored = registered(id="c1")
    refused("CONFLICT", lifecycle.register, factories.certificate(id="c1", patient_id=factories.OTHER_PATIENT),
            stored, False, CATALOGUE, NOW)


def test_register_other_content_is_conflict():
    stored = registered(id="c1")
    refused("CONFLICT", lifecycle.register, factories.certificate(id="c1", type_version="9.9"), stored, False,
            CATALOGUE, NOW)


def test_a_new_registration_computes_no_fingerprint():
    certificate = factories.certificate(fingerprinted=False)
    lifecycle.register(certificate, None, False, CATALOGUE, NOW)
    assert certificate.fingerprint is None


def test_register_again_compares_what_was_stored_without_a_fingerprint_by_its_content_and_document():
    stored = registered(id="c1", fingerprinted=False)
    assert lifecycle.register(factories.certificate(id="c1", fingerprinted=False), stored, False, CATALOGUE,
                              NOW).info == "ALREADY_EXISTS"
    other_document = factories.certificate(id="c1", fingerprinted=False)
    other_document.document = {**other_document.document, "content": "ett annat intyg"}
    refused("CONFLICT", lifecycle.register, other_document, stored, False, CATALOGUE, NOW)


def test_a_fingerprint_stored_by_an_older_version_is_compared_as_it_is():
    stored = registered(id="c1")  # the factory stores the fingerprint, as versions before 0005 did
    again = factories.certificate(id="c1", fingerprinted=False)
    assert lifecycle.register(again, stored, False, CATALOGUE, NOW).info == "ALREADY_EXISTS"
    assert again.content_fingerprint() == stored.fingerprint


def test_without_a_fingerprint_nor_its_document_a_stored_certificate_cannot_be_compared():
    stored = registered(id="c1", fingerprinted=False)
    stored.document = None
    with pytest.raises(ValueError):
        stored.content_fingerprint()


def test_purged_id_is_never_registered_again():
    refused("PURGED", lifecycle.register, factories.certificate(id="c1"), None, True, CATALOGUE, NOW)


def test_register_of_an_unconfigured_type_is_refused():
    refused("UNKNOWN_CERTIFICATE_TYPE", lifecycle.register, factories.certificate(type="xyz"), None, False,
            CATALOGUE, NOW)


# --- slide 4-5: who reaches what ----------------------------------------------------------------------------------
def test_citizen_reaches_own_certificates_only_with_consent():
    certificate = registered()
    assert lifecycle.citizen_get(certificate, given()) is certificate
    refused("NO_CONSENT", lifecycle.citizen_get, certificate, withdrawn())
    refused("NOT_FOUND", lifecycle.citizen_get, certificate, given(factories.OTHER_PATIENT))
    refused("NOT_FOUND", lifecycle.citizen_get, None, given())


def test_care_reaches_only_its_own_care_copies_and_consent_plays_no_part():
    certificate = registered()
    assert lifecycle.care_get(certificate, CARE_GIVER) is certificate
    refused("NOT_FOUND", lifecycle.care_get, certificate, OTHER_CARE_GIVER)
    certificate.available_to_care = False
    refused("NOT_FOUND", lifecycle.care_get, certificate, CARE_GIVER)


@pytest.mark.parametrize("kind", ["db", "doi"])
def test_death_certificates_are_never_shown_to_the_citizen(kind):
    certificate = registered(type=kind)
    assert not certificate.visible_to_citizen(given())
    refused("NOT_FOUND", lifecycle.citizen_get, certificate, given())
    refused("NOT_FOUND", lifecycle.set_status, certificate, given(), "ARCHIVED", NOW)
    assert lifecycle.care_get(certificate, CARE_GIVER) is certificate


def test_care_never_sees_archive_statuses():
    certificate = registered()
    lifecycle.set_status(certificate, given(), "ARCHIVED", NOW)
    lifecycle.set_status(certificate, given(), "RESTORED", NOW)
    assert [s.status for s in certificate.statuses] == ["RECEIVED", "ARCHIVED", "RESTORED"]
    assert [s.status for s in certificate.statuses_for_care()] == ["RECEIVED"]


# --- slide 6: archive -----------------------------------------------------------------------------------------
def test_archived_certificate_stays_available_to_care():
    certificate = registered()
    outcome = lifecycle.set_status(certificate, given(), "ARCHIVED", NOW)
    assert outcome.info is None and certificate.archived
    assert certificate.events == [events.Archived(certificate.id)]
    assert lifecycle.care_get(certificate, CARE_GIVER) is certificate
    assert lifecycle.citizen_get(certificate, given()) is certificate  # in the archive box, still the citizen's


def test_archive_and_restore_twice_is_no_change():
    certificate = registered()
    assert lifecycle.set_status(certificate, given(), "RESTORED", NOW).info == "NO_CHANGE"
    lifecycle.set_status(certificate, given(), "ARCHIVED", NOW)
    assert lifecycle.set_status(certificate, given(), "ARCHIVED", NOW).info == "NO_CHANGE"
    assert [s.status for s in certificate.statuses] == ["RECEIVED", "ARCHIVED"]


def test_archive_needs_consent():
    certificate = registered()
    refused("NO_CONSENT", lifecycle.set_status, certificate, withdrawn(), "ARCHIVED", NOW)
    assert not certificate.archived


# --- slide 7-8: care removes its copy -------------------------------------------------------------------------
def test_care_removal_with_consent_keeps_it_for_the_citizen():
    certificate, purge = registered(), Purge()
    outcome = lifecycle.remove_care_copy(certificate, CARE_GIVER, given(), purge, NOW)
    assert outcome.data == {"outcome": "CITIZEN_ONLY"} and purge.certificates == []
    assert not certificate.available_to_care
    assert certificate.statuses[-1].status == "CARE_COPY_REMOVED"
    assert certificate.events == [events.CareCopyRemoved(certificate.id, CARE_GIVER)]
    assert lifecycle.citizen_get(certificate, given()) is certificate
    refused("NOT_FOUND", lifecycle.care_get, certificate, CARE_GIVER)


def test_care_removal_without_consent_purges():
    certificate, purge = registered(), Purge()
    outcome = lifecycle.remove_care_copy(certificate, CARE_GIVER, withdrawn(), purge, NOW)
    assert outcome.data == {"outcome": "PURGED"} and purge.certificates == [certificate]
    assert certificate.events == [events.Purged(certificate.id, "CARE_COPY_REMOVED_WITHOUT_CONSENT")]


@pytest.mark.parametrize("kind", ["db", "doi"])
def test_care_removal_of_a_death_certificate_purges_even_with_consent(kind):
    """The citizen never has a copy of a death certificate, so without the care copy it is nobody's."""
    certificate, purge = registered(type=kind), Purge()
    outcome = lifecycle.remove_care_copy(certificate, CARE_GIVER, given(), purge, NOW)
    assert outcome.data == {"outcome": "PURGED"} and purge.certificates == [certificate]


def test_care_removal_twice_is_no_change():
    certificate = registered()
    lifecycle.remove_care_copy(certificate, CARE_GIVER, given(), Purge(), NOW)
    certificate.events.clear()
    assert lifecycle.remove_care_copy(certificate, CARE_GIVER, given(), Purge(), NOW).info == "NO_CHANGE"
    assert certificate.events == []


def test_only_the_certificates_care_giver_removes_its_copy():
    certificate = registered()
    refused("NOT_FOUND", lifecycle.remove_care_copy, certificate, OTHER_CARE_GIVER, given(), Purge(), NOW)
    assert certificate.available_to_care


# --- slide 9-10: consent withdrawn --------------------------------------------------------------------------------
def test_consent_withdrawn_hides_everything_from_the_citizen_but_keeps_care_copies():
    certificate, consent, purge = registered(), given(), Purge()
    outcome = lifecycle.set_consent(consent, False, [], purge, NOW)
    assert outcome.data == {"purged": 0} and purge.certificates == []
    assert not consent.given and consent.changed_at == NOW
    refused("NO_CONSENT", lifecycle.citizen_get, certificate, consent)
    refused("NO_CONSENT", lifecycle.require_consent, consent)
    assert lifecycle.care_get(certificate, CARE_GIVER) is certificate


def test_consent_withdrawn_purges_certificates_without_care_copy():
    removed = [registered(id="a"), registered(id="b")]
    consent = given()
    for certificate in removed:
        lifecycle.remove_care_copy(certificate, CARE_GIVER, consent, Purge(), NOW)
        certificate.events.clear()
    purge = Purge()
    outcome = lifecycle.set_consent(consent, False, removed, purge, NOW)
    assert outcome.data == {"purged": 2} and purge.certificates == removed
    assert [c.events for c in removed] == [[events.Purged("a", "CONSENT_WITHDRAWN")],
                                           [events.Purged("b", "CONSENT_WITHDRAWN")]]


def test_consent_already_in_that_state_is_no_change():
    assert lifecycle.set_consent(withdrawn(), False, [], Purge(), NOW).info == "NO_CHANGE"
    assert lifecycle.set_consent(given(), True, [], Purge(), NOW).info == "NO_CHANGE"


# --- slide 11: two availability flags; consent decides deletion -----------------------------------------------
@pytest.mark.parametrize(("available_to_care", "consent", "purge"),
                         [(True, True, False), (True, False, False), (False, True, False), (False, False, True)])
def test_a_certificate_is_purged_only_without_care_copy_and_without_consent(available_to_care, consent, purge):
    certificate = factories.certificate(available_to_care=available_to_care)
    assert must_purge(certificate, Consent(PATIENT, consent)) is purge


# --- send and revoke --------------------------------------------------------------------------------------------
def _sendable(**fields) -> Certificate:
    return registered(**fields)


SEND_CHECKS = ["NOT_FOUND", "REVOKED", "ALREADY_SENT", "TEST_CERTIFICATE", "UNKNOWN_RECIPIENT",
               "RECIPIENT_REJECTS_TYPE"]


@pytest.mark.parametrize("position", range(len(SEND_CHECKS)), ids=SEND_CHECKS)
@pytest.mark.parametrize("sent_by", ["CITIZEN", "CARE"])
def test_send_checks_in_contract_order(position, sent_by):
    """Each check fails when every earlier one passes, even if every later one would fail too."""
    failing = set(SEND_CHECKS[position:])
    expected = SEND_CHECKS[position]
    recipient = ("NOSUCH" if "UNKNOWN_RECIPIENT" in failing else "TRANSP" if "RECIPIENT_REJECTS_TYPE" in failing
                 else "FKASSA")
    certificate = _sendable(patient_id=factories.OTHER_PATIENT if "NOT_FOUND" in failing else PATIENT,
                            test_certificate="TEST_CERTIFICATE" in failing)
    if "ALREADY_SENT" in failing:
        certificate.record("SENT", NOW, target=recipient)
    if "REVOKED" in failing:
        certificate.revoked_at = NOW
    statuses = list(certificate.statuses)
    args = (certificate, given(), PATIENT, recipient, sent_by, CARE_GIVER if sent_by == "CARE" else None,
            CATALOGUE, NOW)
    if expected == "ALREADY_SENT":
        assert lifecycle.send(*args).info == "ALREADY_SENT"
    else:
        refused(expected, lifecycle.send, *args)
    assert certificate.statuses == statuses and certificate.events == []


def test_send_records_sent_and_an_event():
    certificate = _sendable()
    assert lifecycle.send(certificate, given(), PATIENT, "FKASSA", "CITIZEN", None, CATALOGUE, NOW).info is None
    assert certificate.sent_to == ["FKASSA"]
    assert certificate.events == [events.Sent(certificate, "FKASSA", "CITIZEN")]


def test_citizen_send_needs_consent_and_care_send_needs_the_care_copy():
    certificate = _sendable()
    refused("NO_CONSENT", lifecycle.send, certificate, withdrawn(), PATIENT, "FKASSA", "CITIZEN", None, CATALOGUE,
            NOW)
    refused("NOT_FOUND", lifecycle.send, certificate, withdrawn(), PATIENT, "FKASSA", "CARE", OTHER_CARE_GIVER,
            CATALOGUE, NOW)
    refused("NOT_FOUND", lifecycle.send, certificate, withdrawn(), PATIENT, "FKASSA", "CARE", None, CATALOGUE, NOW)
    certificate.available_to_care = False
    refused("NOT_FOUND", lifecycle.send, certificate, withdrawn(), PATIENT, "FKASSA", "CARE", CARE_GIVER,
            CATALOGUE, NOW)


def test_revoke_tells_every_recipient_it_was_sent_to():
    certificate = _sendable()
    for recipient in ("FKASSA", "AF"):
        certificate.record("SENT", NOW, target=recipient)
    assert lifecycle.revoke(certificate, False, PATIENT, "SE-1003", "fel", NOW).info is None
    assert certificate.revoked and certificate.statuses[-1].status == "REVOKED"
    assert certificate.events == [events.Revoked(certificate, "fel", ("FKASSA", "AF"))]
    certificate.events.clear()
    assert lifecycle.revoke(certificate, False, PATIENT, "SE-1003", None, NOW).info == "ALREADY_REVOKED"
    assert certificate.events == []


def test_revoke_of_a_test_certificate_tells_no_recipient():
    certificate = _sendable(test_certificate=True)
    certificate.record("SENT", NOW, target="FKASSA")  # cannot happen through send; still no delivery
    lifecycle.revoke(certificate, False, PATIENT, "SE-1003", None, NOW)
    assert certificate.events[0].sent_to == ()


def test_revoke_of_an_unknown_id_waits_for_its_register_but_a_purged_one_does_not():
    assert refused("NOT_FOUND", lifecycle.revoke, None, False, PATIENT, "x", None, NOW).retry_until_found
    assert not refused("NOT_FOUND", lifecycle.revoke, None, True, PATIENT, "x", None, NOW).retry_until_found
    other = refused("NOT_FOUND", lifecycle.revoke, _sendable(), False, factories.OTHER_PATIENT, "x", None, NOW)
    assert not other.retry_until_found


def test_a_refusal_changes_nothing():
    certificate = _sendable()
    before = (certificate.available_to_care, certificate.archived, list(certificate.statuses))
    for call in (lambda: lifecycle.set_status(certificate, withdrawn(), "ARCHIVED", NOW),
                 lambda: lifecycle.remove_care_copy(certificate, OTHER_CARE_GIVER, given(), Purge(), NOW),
                 lambda: lifecycle.send(certificate, given(), PATIENT, "TRANSP", "CITIZEN", None, CATALOGUE, NOW)):
        with pytest.raises(Refused):
            call()
    assert (certificate.available_to_care, certificate.archived, certificate.statuses) == before
    assert certificate.events == []
