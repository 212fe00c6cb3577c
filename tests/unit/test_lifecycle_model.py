"""Random sequences of commands through the handlers (pipeline + FakeUnitOfWork, one commit per step), checked
after every step against a small reference model of the seed written here, independently of `domain`."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from consumers.pipeline import RetryLater
from domain.model import Catalogue, Recipient

from .harness import CATALOGUE, Service, factories, policy

PATIENTS = (factories.PATIENT, factories.OTHER_PATIENT, factories.THIRD_PATIENT)
GIVERS = {"VG-1": "VE-1", "VG-2": "VE-2"}  # care giver -> its care unit
IDS = tuple(f"c{i}" for i in range(6))
TYPES = ("lisjp", "db", "ts-bas")
HIDDEN = {"db", "doi"}
RECIPIENTS = {"FKASSA": {"lisjp"}, "SKV": {"db"}, "TRANSP": {"ts-bas"}}  # active ones and what they take
TRIED_RECIPIENTS = (*RECIPIENTS, "OLD", "NOSUCH")  # OLD is configured but inactive

# Most commands name the certificate's own patient and care giver, so that sequences get somewhere; the rest
# name any, so that the refusals are tried too.
OWNER = "OWNER"
A_PATIENT = st.sampled_from((OWNER, OWNER, *PATIENTS))
A_GIVER = st.sampled_from((OWNER, OWNER, *GIVERS))

CATALOGUE_WITH_OLD = Catalogue(CATALOGUE.certificate_types, {
    **CATALOGUE.recipients, "OLD": Recipient("OLD", "Nedlagd", frozenset({"lisjp"}), active=False)})


@dataclass
class Cert:
    patient: str
    giver: str
    type: str
    test: bool
    available_to_care: bool = True
    archived: bool = False
    revoked: bool = False
    sent_to: list[str] = field(default_factory=list)

    @property
    def content(self) -> tuple:
        return (self.patient, self.giver, self.type, self.test)


def signed_at(cid: str) -> str:
    return f"2026-01-{10 + int(cid[1:]):02d}T10:00:00+01:00"


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.service = Service(policy=policy(catalogue=CATALOGUE_WITH_OLD, bulk_batch_size=2))
        self.certs: dict[str, Cert] = {}
        self.purged: set[str] = set()
        self.consent: dict[str, bool] = {p: False for p in PATIENTS}
        self.accessed: Counter[tuple[str, str]] = Counter()  # (action, certificate id) of every care access (§9)

    # --- helpers -----------------------------------------------------------------------------------------------
    def answer(self, reply) -> str:
        assert reply is not None
        return reply.code.value if reply.code else reply.result.value

    def patient_of(self, cid: str, patient: str) -> str:
        return self.certs[cid].patient if patient == OWNER and cid in self.certs else (
            PATIENTS[0] if patient == OWNER else patient)

    def giver_of(self, cid: str, giver: str) -> str:
        return self.certs[cid].giver if giver == OWNER and cid in self.certs else (
            next(iter(GIVERS)) if giver == OWNER else giver)

    def purge(self, cid: str) -> None:
        del self.certs[cid]
        self.purged.add(cid)

    def check_new_events(self, expected: list[tuple[str, str]]) -> None:
        """The events of the step, as (routing key, certificate id); broadcasts never name the patient."""
        got = []
        for key, body in self.service.new_events():
            if key.startswith("certificate."):
                assert "patient_id" not in body and "document" not in body
                assert not any(p in json.dumps(body) for p in PATIENTS)
            got.append((key, body.get("certificate_id") or body["certificate"]["id"]))
        assert sorted(got) == sorted(expected)

    # --- rules ---------------------------------------------------------------------------------------------------
    @initialize(start=st.lists(st.tuples(st.sampled_from(PATIENTS), st.sampled_from(tuple(GIVERS)),
                                         st.sampled_from(TYPES)), min_size=3, max_size=3),
                consenting=st.sets(st.sampled_from(PATIENTS)))
    def some_certificates_and_consents(self, start, consenting):
        """A few certificates and consents to begin with, through the same rules, so that short runs get far."""
        for patient in sorted(consenting):
            self.set_consent(patient, True)
        for n, (patient, giver, kind) in enumerate(start):
            self.register(IDS[n], patient, giver, kind, False)

    @rule(cid=st.sampled_from(IDS), patient=st.sampled_from(PATIENTS), giver=st.sampled_from(tuple(GIVERS)),
          kind=st.sampled_from(TYPES), test=st.sampled_from((False, False, False, True)))
    def register(self, cid, patient, giver, kind, test):
        reply = self.service.register(id=cid, patient_id=patient, type=kind, test_certificate=test,
                                      signed_at=signed_at(cid), issued_by=factories.issued_by(giver, GIVERS[giver]))
        new = Cert(patient, giver, kind, test)
        if cid in self.purged:
            expected, events = "PURGED", []
        elif cid in self.certs:
            expected = "ALREADY_EXISTS" if self.certs[cid].content == new.content else "CONFLICT"
            events = []
        else:
            expected, events = "OK", [("certificate.registered", cid)]
            self.certs[cid] = new
        assert self.answer(reply) == expected
        self.check_new_events(events)

    @rule(cid=st.sampled_from(IDS), patient=A_PATIENT, status=st.sampled_from(("ARCHIVED", "RESTORED")))
    def set_status(self, cid, patient, status):
        patient = self.patient_of(cid, patient)
        reply = self.service.set_status(cid, patient, status)
        cert = self.certs.get(cid)
        events = []
        if not self.consent[patient]:
            expected = "NO_CONSENT"
        elif cert is None or cert.patient != patient or cert.type in HIDDEN:
            expected = "NOT_FOUND"
        elif cert.archived == (status == "ARCHIVED"):
            expected = "NO_CHANGE"
        else:
            expected, cert.archived = "OK", status == "ARCHIVED"
            events = [(f"certificate.{status.lower()}", cid)]
        assert self.answer(reply) == expected
        self.check_new_events(events)

    @rule(cid=st.sampled_from(IDS), patient=A_PATIENT,
          recipient=st.sampled_from((*TRIED_RECIPIENTS, "FITTING", "FITTING", "FITTING")),
          by_care=st.booleans(), giver=A_GIVER)
    def send(self, cid, patient, recipient, by_care, giver):
        patient, giver = self.patient_of(cid, patient), self.giver_of(cid, giver)
        if recipient == "FITTING":  # most sends go where the type is taken, so that revokes have someone to tell
            known = self.certs.get(cid)
            recipient = next((r for r, types in RECIPIENTS.items() if known and known.type in types), "FKASSA")
        reply = self.service.send_to(cid, recipient, patient, "CARE" if by_care else "CITIZEN",
                                     giver if by_care else None)
        cert = self.certs.get(cid)
        events = []
        if not by_care and not self.consent[patient]:
            expected = "NO_CONSENT"
        elif cert is None or cert.patient != patient or (
                not by_care and cert.type in HIDDEN) or (by_care and (cert.giver != giver or not cert.available_to_care)):
            expected = "NOT_FOUND"
        elif cert.revoked:
            expected = "REVOKED"
        elif recipient in cert.sent_to:
            expected = "ALREADY_SENT"
        elif cert.test:
            expected = "TEST_CERTIFICATE"
        elif recipient not in RECIPIENTS:
            expected = "UNKNOWN_RECIPIENT"
        elif cert.type not in RECIPIENTS[recipient]:
            expected = "RECIPIENT_REJECTS_TYPE"
        else:
            expected = "OK"
            cert.sent_to.append(recipient)
            events = [("certificate.sent", cid), (f"recipient.{recipient}.certificate.sent", cid)]
        if by_care and expected != "NOT_FOUND":
            self.accessed["SEND", cid] += 1
        assert self.answer(reply) == expected
        self.check_new_events(events)

    @rule(cid=st.sampled_from(IDS), patient=A_PATIENT)
    def revoke(self, cid, patient):
        patient = self.patient_of(cid, patient)
        cert = self.certs.get(cid)
        if cert is None and cid not in self.purged:
            try:
                self.service.revoke(cid, patient)
            except RetryLater as later:
                assert later.reply.code.value == "NOT_FOUND"
            else:
                raise AssertionError("a revoke of an unknown id must wait for its register")
            self.check_new_events([])
            return
        reply = self.service.revoke(cid, patient)
        events = []
        if cert is None or cert.patient != patient:
            expected = "NOT_FOUND"
        elif cert.revoked:
            expected = "ALREADY_REVOKED"
        else:
            expected, cert.revoked = "OK", True
            events = [("certificate.revoked", cid)] + [
                (f"recipient.{r}.certificate.revoked", cid) for r in ([] if cert.test else cert.sent_to)]
        if expected != "NOT_FOUND":
            self.accessed["REVOKE", cid] += 1
        assert self.answer(reply) == expected
        self.check_new_events(events)

    def _remove(self, cid: str, cert: Cert) -> tuple[str, str]:
        cert.available_to_care = False
        if self.consent[cert.patient] and cert.type not in HIDDEN:
            return "CITIZEN_ONLY", "certificate.care-copy-removed"
        self.purge(cid)
        return "PURGED", "certificate.purged"

    @rule(cid=st.sampled_from(IDS), giver=A_GIVER)
    def remove_care_copy(self, cid, giver):
        giver = self.giver_of(cid, giver)
        reply = self.service.remove_care_copy(cid, giver)
        cert = self.certs.get(cid)
        events = []
        if cert is not None and cert.giver == giver:
            self.accessed["REMOVE_CARE_COPY", cid] += 1
        if cert is None or cert.giver != giver:
            assert self.answer(reply) == "NOT_FOUND"
        elif not cert.available_to_care:
            assert (self.answer(reply), reply.data) == ("NO_CHANGE", {"outcome": "CITIZEN_ONLY"})
        else:
            outcome, event = self._remove(cid, cert)
            assert (self.answer(reply), reply.data) == ("OK", {"outcome": outcome})
            events = [(event, cid)]
        self.check_new_events(events)

    @rule(giver=st.sampled_from(tuple(GIVERS)))
    def care_giver_leaves(self, giver):
        reply = self.service.remove_care_copies(giver)
        counts = {"citizen_only": 0, "purged": 0}
        events = []
        for cid, cert in sorted(self.certs.items()):
            if cert.giver == giver and cert.available_to_care:
                self.accessed["REMOVE_CARE_COPY", cid] += 1
                outcome, event = self._remove(cid, cert)
                counts[outcome.lower()] += 1
                events.append((event, cid))
        assert (self.answer(reply), reply.data) == ("OK", counts)
        self.check_new_events(events)

    @rule(patient=st.sampled_from(PATIENTS), given=st.booleans())
    def set_consent(self, patient, given):
        reply = self.service.consent(patient, given)
        events = []
        if self.consent[patient] == given:
            assert (self.answer(reply), reply.data) == ("NO_CHANGE", {"purged": 0})
        else:
            self.consent[patient] = given
            doomed = [] if given else [cid for cid, c in self.certs.items()
                                       if c.patient == patient and not c.available_to_care]
            for cid in doomed:
                self.purge(cid)
            events = [("certificate.purged", cid) for cid in doomed]
            assert (self.answer(reply), reply.data) == ("OK", {"purged": len(doomed)})
        self.check_new_events(events)

    # --- after every step ------------------------------------------------------------------------------------------
    @invariant()
    def the_citizen_sees_what_the_seed_says(self):
        for patient in PATIENTS:
            for archived in (False, True):
                listed = self.service.citizen_ids(patient, archived=archived, page_size=1000)
                if not self.consent[patient]:
                    assert listed == "NO_CONSENT"
                    continue
                assert listed == sorted((cid for cid, c in self.certs.items()
                                         if c.patient == patient and c.type not in HIDDEN and c.archived == archived),
                                        key=lambda cid: int(cid[1:]), reverse=True)
            for cid in IDS:
                reply = self.service.get(cid, patient)
                cert = self.certs.get(cid)
                if not self.consent[patient]:
                    assert self.answer(reply) == "NO_CONSENT"
                elif cert is None or cert.patient != patient or cert.type in HIDDEN:
                    assert self.answer(reply) == "NOT_FOUND"
                else:
                    data = reply.data
                    assert (data["archived"], data["available_to_care"], data["revoked"], data["sent_to"]) == (
                        cert.archived, cert.available_to_care, cert.revoked, cert.sent_to)

    @invariant()
    def each_care_giver_sees_only_its_care_copies(self):
        for giver in GIVERS:
            for cid in IDS:
                cert = self.certs.get(cid)
                reply = self.service.get_for_care(cid, giver)
                visible = cert is not None and cert.giver == giver and cert.available_to_care
                assert self.answer(reply) == ("OK" if visible else "NOT_FOUND")
                if visible:
                    self.accessed["READ", cid] += 1
                    assert "archived" not in reply.data
                    assert not {s["status"] for s in reply.data["statuses"]} & {"ARCHIVED", "RESTORED"}
            for patient in PATIENTS:
                listed = self.service.care_ids(patient, giver, tuple(GIVERS.values()))
                self.accessed.update(("LIST", cid) for cid in listed)
                assert sorted(listed) == sorted(cid for cid, c in self.certs.items()
                                                if c.patient == patient and c.giver == giver and c.available_to_care)

    @invariant()
    def every_care_access_has_exactly_one_entry_published_once(self):
        """§9, whatever happened to the certificate since (purged ones included)."""
        log = self.service.uow.state.access_log.values()
        assert Counter((e.action, e.certificate_id) for e in log) == self.accessed
        assert all(e.person_id == factories.ACCESSED_BY["person_id"] for e in log)
        published = Counter(e["event_id"] for e in self.service.access_events())
        assert len(published) == sum(self.accessed.values()) and set(published.values()) <= {1}

    @invariant()
    def purged_ids_never_come_back(self):
        stored = self.service.uow.state.certificates
        assert set(stored) == set(self.certs)
        assert not self.purged & set(stored)
        for cid in sorted(self.purged):
            assert self.answer(self.service.register(id=cid)) == "PURGED"
        self.service.new_events()  # a refused register publishes nothing; the next step checks its own

    @invariant()
    def no_certificate_without_care_copy_while_its_patient_has_no_consent(self):
        for cert in self.service.uow.state.certificates.values():
            consent = self.service.uow.state.consents.get(cert.patient_id)
            assert cert.available_to_care or (consent is not None and consent.given)

    @invariant()
    def no_death_certificate_without_care_copy(self):
        """Nobody could reach it: the citizen never sees db/doi, and care has removed its copy."""
        for cert in self.service.uow.state.certificates.values():
            assert cert.available_to_care or cert.type not in HIDDEN


Lifecycle.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
TestLifecycle = Lifecycle.TestCase
