"""Every handler through the real unit of work on a migrated PostgreSQL database: a message is parsed
(`pipeline.parse`), applied (`pipeline.process` in a `SqlUnitOfWork`) and committed, exactly as the message loop
does it, and the tests then read what landed in the tables (statuses, tombstones, inbox, outbox).

The module works in a database of its own (see `tests/databases.py`), emptied before each test.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
import uuid
from typing import Any

import pytest
from personnummer import personnummer as pnr
from sqlalchemy import func, select, text

from consumers.pipeline import Envelope, Policy, parse, process
from contracts.certificate import Certificate as WireCertificate
from contracts.topology import ACCESS_LOGGED
from domain.model import fingerprint
from service.settings import Settings
from storage.retention import Retention, delete_batch
from storage.tables import (access_log, certificate_documents, certificate_statuses, certificates, consents, metadata,
                            outbox, tombstones)
from storage.uow import SqlUnitOfWork

try:
    from tests import factories
    from tests.databases import empty_tables, migrated_engine
except ImportError:  # tests/ itself on sys.path
    import factories
    from databases import empty_tables, migrated_engine

pytestmark = pytest.mark.integration

PATIENT = "191212121212"
OTHER_PATIENT = factories.OTHER_PATIENT  # 199001012385
THIRD_PATIENT = factories.THIRD_PATIENT  # 201701102384
GIVER, OTHER_GIVER = factories.CARE_GIVER, factories.OTHER_CARE_GIVER
UNIT, UNIT_2, UNIT_3 = "SE2321000016-1004", "SE2321000016-1005", "SE2321000016-2004"
BY = {"accessed_by": factories.ACCESSED_BY}  # CONTRACT §9: care messages name who accesses
CATALOGUE = Settings().catalogue
POLICY = Policy(catalogue=CATALOGUE)
# Not ASCII, not normalised, with CR LF, tabs and trailing blanks: the journal copy must come back byte for byte.
DOCUMENT_TEXT = ("<intyg>\r\n\t<namn>Åsa Öberg-Ängström</namn>  \n"
                 "\t<diagnos>F32.1 – ☤ 🩺 ﬁ e\u0301</diagnos>\n</intyg>  \n")


def _valid(*numbers: str) -> None:
    for number in numbers:
        assert pnr.valid(number), number


_valid(PATIENT, OTHER_PATIENT, THIRD_PATIENT)


# --- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(database_url):
    with migrated_engine(database_url, "handlers", pool_size=10, max_overflow=10) as engine:
        yield engine


@pytest.fixture(autouse=True)
def _empty_tables(engine):
    empty_tables(engine)


# --- driving messages -------------------------------------------------------------------------------------------
def envelope(routing_key: str, body: dict[str, Any], message_id: str | None = None,
             reply_to: str | None = "amq.rabbitmq.reply-to") -> Envelope:
    return Envelope(routing_key=routing_key, body=json.dumps(body, ensure_ascii=False).encode(),
                    message_id=message_id or f"msg-{uuid.uuid4()}", reply_to=reply_to,
                    content_type="application/json")


def handle(engine, routing_key: str, body: dict[str, Any], *, message_id: str | None = None,
           policy: Policy = POLICY) -> dict[str, Any]:
    """parse, process, commit; a care giver leaving goes on in a new transaction while `more`. The reply as JSON."""
    parsed = parse(envelope(routing_key, body, message_id), policy)
    processed = None
    while processed is None or processed.more:
        with SqlUnitOfWork(engine) as uow:
            processed = process(parsed, uow, policy)
            uow.commit()
    assert processed.reply is not None
    return processed.reply.model_dump(mode="json")


def ok(reply: dict[str, Any]) -> dict[str, Any] | None:
    assert reply["result"] == "OK", reply
    return reply["data"]


def code(reply: dict[str, Any]) -> str | None:
    return reply["code"]


def register(engine, **overrides) -> dict[str, Any]:
    """Registers a fresh certificate (factories' valid one, `overrides` applied); returns its wire JSON."""
    overrides.setdefault("id", f"intyg-{uuid.uuid4()}")
    giver, unit = overrides.pop("care_giver_id", GIVER), overrides.pop("care_unit_id", UNIT)
    overrides.setdefault("issued_by", factories.issued_by(giver, unit))
    body = factories.certificate_json(**overrides)
    ok(handle(engine, "certificate.register", {"certificate": body}))
    return body


def give_consent(engine, patient_id: str, given: bool = True) -> dict[str, Any]:
    return handle(engine, "consent.set", {"patient_id": patient_id, "given": given})


def citizen_get(engine, certificate: dict[str, Any]) -> dict[str, Any]:
    return handle(engine, "certificate.get",
                  {"certificate_id": certificate["id"], "patient_id": certificate["patient_id"]})


def citizen_list(engine, patient_id: str, **query) -> list[dict[str, Any]]:
    data = ok(handle(engine, "certificate.list", {"patient_id": patient_id, **query}))
    return data["certificates"]


def care_list(engine, patient_id: str, care_giver_id: str, units: list[str], **query) -> dict[str, Any]:
    return ok(handle(engine, "certificate.list-for-care",
                     {"patient_id": patient_id, "care_giver_id": care_giver_id, "care_unit_ids": units, **BY,
                      **query}))


def set_status(engine, certificate: dict[str, Any], status: str, **kw) -> dict[str, Any]:
    return handle(engine, "certificate.set-status", {"certificate_id": certificate["id"],
                                                     "patient_id": certificate["patient_id"], "status": status}, **kw)


def send(engine, certificate: dict[str, Any], recipient: str = "FKASSA", **kw) -> dict[str, Any]:
    return handle(engine, "certificate.send",
                  {"certificate_id": certificate["id"], "patient_id": certificate["patient_id"],
                   "recipient_id": recipient, "sent_by": "CITIZEN", "care_giver_id": None}, **kw)


def remove_care_copy(engine, certificate: dict[str, Any], **kw) -> dict[str, Any]:
    return handle(engine, "certificate.remove-care-copy",
                  {"certificate_id": certificate["id"],
                   "care_giver_id": certificate["issued_by"]["care_giver"]["id"], **BY}, **kw)


# --- reading what landed ----------------------------------------------------------------------------------------
def outbox_rows(engine) -> list[tuple[str, dict[str, Any]]]:
    """(routing key, body) of the events in publication order; access log entries (`access.logged`) left out."""
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.routing_key, outbox.c.body)
                            .where(outbox.c.kind == "event", outbox.c.routing_key != ACCESS_LOGGED)
                            .order_by(outbox.c.id)).all()
    return [(r.routing_key, json.loads(bytes(r.body))) for r in rows]


def events_of(engine, certificate_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(key, body) for key, body in outbox_rows(engine)
            if body.get("certificate_id") == certificate_id
            or (body.get("certificate") or {}).get("id") == certificate_id]


def stored_statuses(engine, certificate_id: str) -> list[tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(select(certificate_statuses.c.status, certificate_statuses.c.target)
                            .where(certificate_statuses.c.certificate_id == certificate_id)
                            .order_by(certificate_statuses.c.position)).all()
    return [(r.status, r.target) for r in rows]


def row_of(engine, certificate_id: str):
    with engine.connect() as conn:
        return conn.execute(select(certificates).where(certificates.c.id == certificate_id)).first()


def tombstone_of(engine, certificate_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(select(tombstones.c.reason)
                            .where(tombstones.c.certificate_id == certificate_id)).scalar_one_or_none()


def tables_mentioning(engine, needle: str) -> set[str]:
    """Every table with a row whose text form contains `needle` (a purged certificate must leave no trace but its
    tombstone and the inbox/outbox rows of the messages that handled it)."""
    found = set()
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            hit = conn.execute(text(f"SELECT EXISTS (SELECT 1 FROM {table.name} t WHERE "
                                    f"t::text LIKE '%' || :needle || '%')"), {"needle": needle}).scalar_one()
            if hit:
                found.add(table.name)
    return found


def count(engine, table, column, value) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(table.c[column] == value)).scalar_one()


def assert_purged(engine, certificate: dict[str, Any], reason: str) -> None:
    assert tombstone_of(engine, certificate["id"]) == reason
    # The access log documents who accessed it, not its content: its entries (ids only) outlive the purge (§9).
    assert tables_mentioning(engine, certificate["id"]) <= {"tombstones", "inbox", "outbox", "access_log"}
    for table in (certificates, certificate_documents, certificate_statuses):
        assert count(engine, table, "id" if table is certificates else "certificate_id", certificate["id"]) == 0


def _certificate_fields(stored: dict[str, Any]) -> dict[str, Any]:
    return {key: stored[key] for key in factories.certificate_json()}


# --- the whole life of a certificate ----------------------------------------------------------------------------
def test_a_certificate_from_register_to_purge(engine):
    ok(give_consent(engine, PATIENT))
    first = register(engine, type="lisjp", signed_at="2026-11-25T09:30:00+01:00",
                     document={"media_type": "application/xml", "encoding": "utf-8", "content": DOCUMENT_TEXT},
                     relations=[{"code": "ERSATT", "certificate_id": "earlier-1"}])
    second = register(engine, type="luse", signed_at="2026-10-01T10:00:00+02:00", valid_from=None, valid_to=None)
    death = register(engine, type="db", signed_at="2026-12-01T10:00:00+01:00")  # never shown to the citizen
    registered = events_of(engine, first["id"])
    assert [key for key, _ in registered] == ["certificate.registered"]
    assert "patient_id" not in registered[0][1] and "document" not in registered[0][1]

    # get: every registered field as given, the document byte for byte; the 13-character form of the id works
    got = ok(handle(engine, "certificate.get", {"certificate_id": first["id"], "patient_id": "19121212-1212"}))
    assert _certificate_fields(got) == first
    assert got["document"]["content"].encode() == DOCUMENT_TEXT.encode()
    assert (got["revoked"], got["revoked_at"], got["sent_to"]) == (False, None, [])
    assert (got["archived"], got["available_to_care"]) == (False, True)
    assert [s["status"] for s in got["statuses"]] == ["RECEIVED"]
    assert code(citizen_get(engine, death)) == "NOT_FOUND"

    # list: newest first, no documents, no death certificates
    listed = citizen_list(engine, PATIENT)
    assert [c["id"] for c in listed] == [first["id"], second["id"]]
    assert all("document" not in c for c in listed)
    assert _certificate_fields({**listed[0], "document": first["document"]}) == first

    # archive -> out of view, in the archived list, still gettable; restore -> back
    ok(set_status(engine, first, "ARCHIVED"))
    assert code(set_status(engine, first, "ARCHIVED")) == "NO_CHANGE"
    assert [c["id"] for c in citizen_list(engine, PATIENT)] == [second["id"]]
    archived = citizen_list(engine, PATIENT, archived=True)
    assert [(c["id"], c["archived"]) for c in archived] == [(first["id"], True)]
    assert ok(citizen_get(engine, first))["archived"] is True
    care_view = care_list(engine, PATIENT, GIVER, [UNIT])["certificates"]
    # archiving is not care's business; death certificates are care's as any other
    assert [c["id"] for c in care_view] == [death["id"], first["id"], second["id"]]
    assert all("archived" not in c and {s["status"] for s in c["statuses"]} == {"RECEIVED"} for c in care_view)
    ok(set_status(engine, first, "RESTORED"))
    assert [c["id"] for c in citizen_list(engine, PATIENT)] == [first["id"], second["id"]]

    # send to FKASSA: the broadcast event, then the recipient delivery with the whole certificate
    before = len(outbox_rows(engine))
    ok(send(engine, first))
    new = outbox_rows(engine)[before:]
    assert [key for key, _ in new] == ["certificate.sent", "recipient.FKASSA.certificate.sent"]
    assert new[0][1]["certificate_id"] == first["id"] and new[0][1]["recipient_id"] == "FKASSA"
    assert "patient_id" not in new[0][1] and "certificate" not in new[0][1]
    assert new[1][1]["certificate"] == first
    assert new[1][1]["certificate"]["document"]["content"].encode() == DOCUMENT_TEXT.encode()
    assert code(send(engine, first)) == "ALREADY_SENT"

    # revoke: the recipient it was sent to is told
    before = len(outbox_rows(engine))
    ok(handle(engine, "certificate.revoke", {"certificate_id": first["id"], "patient_id": PATIENT,
                                             "revoked_by": {"person_id": "SE2321000016-1003", "name": "Ajla"},
                                             "reason": "fel patient", **BY}))
    new = outbox_rows(engine)[before:]
    assert [key for key, _ in new] == ["certificate.revoked", "recipient.FKASSA.certificate.revoked"]
    assert new[1][1] | {"event_id": None, "occurred_at": None} == {
        "event_id": None, "occurred_at": None, "type": "recipient.FKASSA.certificate.revoked",
        "recipient_id": "FKASSA", "certificate_id": first["id"], "patient_id": PATIENT, "reason": "fel patient"}
    got = ok(citizen_get(engine, first))
    assert got["revoked"] is True and got["revoked_at"] is not None and got["sent_to"] == ["FKASSA"]
    assert [s["status"] for s in got["statuses"]] == ["RECEIVED", "ARCHIVED", "RESTORED", "SENT", "REVOKED"]
    assert stored_statuses(engine, first["id"])[3] == ("SENT", "FKASSA")
    assert code(send(engine, second, "TRANSP")) == "RECIPIENT_REJECTS_TYPE"

    # remove the care copy with consent: the citizen's only
    assert ok(remove_care_copy(engine, first)) == {"outcome": "CITIZEN_ONLY"}
    assert [c["id"] for c in care_list(engine, PATIENT, GIVER, [UNIT])["certificates"]] == [death["id"], second["id"]]
    got = ok(citizen_get(engine, first))
    assert got["available_to_care"] is False and got["statuses"][-1]["status"] == "CARE_COPY_REMOVED"
    assert code(remove_care_copy(engine, first)) == "NO_CHANGE"
    assert code(handle(engine, "certificate.get-for-care",
                       {"certificate_id": first["id"], "care_giver_id": GIVER, **BY})) == "NOT_FOUND"

    # consent withdrawn: the certificate without care copy goes for good; the others stay with care
    assert ok(give_consent(engine, PATIENT, False)) == {"purged": 1}
    assert_purged(engine, first, "CONSENT_WITHDRAWN")
    assert events_of(engine, first["id"])[-1][0] == "certificate.purged"
    assert events_of(engine, first["id"])[-1][1]["reason"] == "CONSENT_WITHDRAWN"
    assert row_of(engine, second["id"]) is not None and row_of(engine, death["id"]) is not None
    assert code(citizen_list_reply(engine, PATIENT)) == "NO_CONSENT"

    # a late or replayed register never brings it back
    assert code(handle(engine, "certificate.register", {"certificate": first})) == "PURGED"
    assert row_of(engine, first["id"]) is None
    ok(give_consent(engine, PATIENT))
    assert code(citizen_get(engine, first)) == "NOT_FOUND"


def citizen_list_reply(engine, patient_id: str) -> dict[str, Any]:
    return handle(engine, "certificate.list", {"patient_id": patient_id})


def test_base64_document_comes_back_as_given(engine):
    ok(give_consent(engine, OTHER_PATIENT))
    raw = base64.b64encode(bytes(range(256)) + "Åsa".encode("latin-1")).decode()
    body = register(engine, patient_id=OTHER_PATIENT,
                    document={"media_type": "application/pdf", "encoding": "base64", "content": raw})
    assert ok(citizen_get(engine, body))["document"] == body["document"]
    got = ok(handle(engine, "certificate.get-for-care", {"certificate_id": body["id"], "care_giver_id": GIVER, **BY}))
    assert got["document"] == body["document"] and "archived" not in got


def test_removing_the_care_copy_without_consent_purges(engine):
    body = register(engine, patient_id=OTHER_PATIENT)
    assert ok(remove_care_copy(engine, body)) == {"outcome": "PURGED"}
    assert_purged(engine, body, "CARE_COPY_REMOVED_WITHOUT_CONSENT")
    assert [key for key, _ in events_of(engine, body["id"])] == ["certificate.registered", "certificate.purged"]
    assert events_of(engine, body["id"])[-1][1]["reason"] == "CARE_COPY_REMOVED_WITHOUT_CONSENT"
    assert code(handle(engine, "certificate.register", {"certificate": body})) == "PURGED"
    assert code(remove_care_copy(engine, body)) == "NOT_FOUND"


def test_another_care_giver_cannot_remove_the_care_copy(engine):
    body = register(engine)
    reply = handle(engine, "certificate.remove-care-copy", {"certificate_id": body["id"], "care_giver_id": OTHER_GIVER,
                                                            **BY})
    assert code(reply) == "NOT_FOUND"
    assert row_of(engine, body["id"]).available_to_care is True


# --- a care giver leaves ----------------------------------------------------------------------------------------
def test_a_care_giver_leaving_is_done_in_batches_with_right_totals(engine):
    policy = Policy(catalogue=CATALOGUE, bulk_batch_size=5)
    with_consent, without_consent = PATIENT, OTHER_PATIENT
    ok(give_consent(engine, with_consent))
    ok(give_consent(engine, THIRD_PATIENT))
    kept = [register(engine, patient_id=with_consent, care_unit_id=UNIT if i % 2 else UNIT_2) for i in range(5)]
    purged = [register(engine, patient_id=without_consent) for _ in range(6)]
    already = register(engine, patient_id=THIRD_PATIENT)
    ok(remove_care_copy(engine, already))  # no longer a care copy: not counted again
    others = [register(engine, patient_id=p, care_giver_id=OTHER_GIVER, care_unit_id=UNIT_3)
              for p in (with_consent, without_consent)]

    parsed = parse(envelope("care-giver.remove-care-copies", {"care_giver_id": GIVER, **BY}, "leaving-1"), policy)
    calls, processed = 0, None
    while processed is None or processed.more:
        with SqlUnitOfWork(engine) as uow:  # each batch its own transaction
            processed = process(parsed, uow, policy)
            uow.commit()
        calls += 1
        assert calls < 10
    assert calls == 3  # 11 care copies in batches of 5: 5, 5, 1
    reply = processed.reply.model_dump(mode="json")
    assert ok(reply) == {"citizen_only": 5, "purged": 6}

    for body in kept:
        row = row_of(engine, body["id"])
        assert row.available_to_care is False
        assert stored_statuses(engine, body["id"])[-1] == ("CARE_COPY_REMOVED", GIVER)
    for body in purged:
        assert_purged(engine, body, "CARE_COPY_REMOVED_WITHOUT_CONSENT")
    for body in others:
        assert row_of(engine, body["id"]).available_to_care is True
    assert len(stored_statuses(engine, already["id"])) == 2
    keys = [key for key, _ in outbox_rows(engine)]
    assert keys.count("certificate.care-copy-removed") == 5 + 1 and keys.count("certificate.purged") == 6

    # the same message again: the stored totals, nothing done twice
    events_before = len(outbox_rows(engine))
    assert handle(engine, "care-giver.remove-care-copies", {"care_giver_id": GIVER, **BY}, message_id="leaving-1",
                  policy=policy) == reply
    assert len(outbox_rows(engine)) == events_before
    # a later, new message finds nothing left
    assert ok(handle(engine, "care-giver.remove-care-copies", {"care_giver_id": GIVER, **BY}, policy=policy)) == {
        "citizen_only": 0, "purged": 0}


# --- care's view ------------------------------------------------------------------------------------------------
def test_list_for_care_shows_only_the_named_units_of_the_care_giver(engine):
    ok(give_consent(engine, PATIENT))
    in_unit = [register(engine, care_unit_id=UNIT, signed_at=f"2026-11-{day:02d}T09:00:00+01:00")
               for day in (1, 2, 3)]
    in_unit_2 = register(engine, care_unit_id=UNIT_2, signed_at="2026-11-04T09:00:00+01:00")
    other_giver = register(engine, care_giver_id=OTHER_GIVER, care_unit_id=UNIT, signed_at="2026-11-05T09:00:00+01:00")
    other_patient = register(engine, patient_id=OTHER_PATIENT, care_unit_id=UNIT)
    removed = register(engine, care_unit_id=UNIT, signed_at="2026-11-06T09:00:00+01:00")
    ok(remove_care_copy(engine, removed))
    ok(set_status(engine, in_unit[0], "ARCHIVED"))

    def ids(units, **query):
        return [c["id"] for c in care_list(engine, PATIENT, GIVER, units, **query)["certificates"]]

    assert ids([UNIT]) == [c["id"] for c in reversed(in_unit)]
    assert ids([UNIT_2]) == [in_unit_2["id"]]
    assert ids([UNIT, UNIT_2, UNIT_3]) == [in_unit_2["id"]] + [c["id"] for c in reversed(in_unit)]
    assert ids([UNIT_3]) == []
    assert [c["id"] for c in care_list(engine, PATIENT, OTHER_GIVER, [UNIT])["certificates"]] == [other_giver["id"]]
    assert other_patient["id"] not in ids([UNIT]) and removed["id"] not in ids([UNIT])

    # paging with the token walks the same order without gaps or repeats
    seen, token = [], None
    while True:
        page = care_list(engine, PATIENT, GIVER, [UNIT, UNIT_2], page_size=2, page_token=token)
        seen += [c["id"] for c in page["certificates"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == ids([UNIT, UNIT_2])

    # what the citizen files away is not care's business
    view = care_list(engine, PATIENT, GIVER, [UNIT])["certificates"][-1]
    assert view["id"] == in_unit[0]["id"]
    assert "archived" not in view and "available_to_care" not in view and "document" not in view
    assert [s["status"] for s in view["statuses"]] == ["RECEIVED"]


# --- consent and recipients -------------------------------------------------------------------------------------
def test_consent_get_and_set(engine):
    assert ok(handle(engine, "consent.get", {"patient_id": THIRD_PATIENT})) == {"given": False, "changed_at": None}
    ok(give_consent(engine, THIRD_PATIENT))
    got = ok(handle(engine, "consent.get", {"patient_id": THIRD_PATIENT}))
    assert got["given"] is True and dt.datetime.fromisoformat(got["changed_at"]).tzinfo is not None
    assert code(give_consent(engine, THIRD_PATIENT)) == "NO_CHANGE"
    assert ok(give_consent(engine, THIRD_PATIENT, False)) == {"purged": 0}
    assert ok(handle(engine, "consent.get", {"patient_id": THIRD_PATIENT}))["given"] is False
    with engine.connect() as conn:
        assert conn.execute(select(consents.c.given).where(consents.c.patient_id == THIRD_PATIENT)).scalar_one() \
            is False


def test_recipient_list(engine):
    everyone = ok(handle(engine, "recipient.list", {}))["recipients"]
    assert {r["id"] for r in everyone} == {"FKASSA", "TRANSP", "AF", "SKV", "SOS"}
    fkassa = ok(handle(engine, "recipient.list", {"certificate_type": "lisjp"}))["recipients"]
    assert fkassa == [{"id": "FKASSA", "name": "Försäkringskassan",
                       "certificate_types": ["fk7263", "lisjp", "luae_fs", "luae_na", "luse"],
                       "trusted": True, "active": True}]
    assert ok(handle(engine, "recipient.list", {"certificate_type": "ag114"}))["recipients"] == []


# --- the same id registered again ----------------------------------------------------------------------------------
def test_registering_an_id_again_compares_the_stored_content_and_document(engine):
    body = factories.certificate_json(id="intyg-again")
    assert code(handle(engine, "certificate.register", {"certificate": body})) is None
    with engine.connect() as conn:  # a new registration computes no fingerprint (migration 0005)
        assert conn.execute(select(certificates.c.fingerprint)).scalar_one() is None
    assert code(handle(engine, "certificate.register", {"certificate": body})) == "ALREADY_EXISTS"
    other_document = {**body, "document": {**body["document"], "content": "ett annat intyg"}}
    assert code(handle(engine, "certificate.register", {"certificate": other_document})) == "CONFLICT"
    assert code(handle(engine, "certificate.register", {"certificate": {**body, "type_version": "9.9"}})) == "CONFLICT"


def test_a_fingerprint_stored_by_an_older_version_is_used_as_it_is(engine):
    body = factories.certificate_json(id="intyg-older")
    assert code(handle(engine, "certificate.register", {"certificate": body})) is None
    content = WireCertificate.model_validate(body).model_dump(mode="json")
    for stored, expected in ((fingerprint(content), "ALREADY_EXISTS"), ("0" * 64, "CONFLICT")):
        with engine.begin() as conn:
            conn.execute(certificates.update().values(fingerprint=stored))
        assert code(handle(engine, "certificate.register", {"certificate": body})) == expected


# --- at most once per message id --------------------------------------------------------------------------------
def test_a_repeated_message_id_gets_the_same_reply_and_no_second_effect(engine):
    ok(give_consent(engine, PATIENT))
    body = factories.certificate_json(id="intyg-once")
    first = handle(engine, "certificate.register", {"certificate": body}, message_id="register-1")
    assert handle(engine, "certificate.register", {"certificate": body}, message_id="register-1") == first
    assert code(handle(engine, "certificate.register", {"certificate": body})) == "ALREADY_EXISTS"  # new id

    sent = send(engine, body, message_id="send-1")
    archived = set_status(engine, body, "ARCHIVED", message_id="archive-1")
    events = outbox_rows(engine)
    statuses = stored_statuses(engine, body["id"])
    assert send(engine, body, message_id="send-1") == sent
    assert set_status(engine, body, "ARCHIVED", message_id="archive-1") == archived
    assert ok(sent) is None and archived["result"] == "OK"
    assert stored_statuses(engine, body["id"]) == statuses == [("RECEIVED", None), ("SENT", "FKASSA"),
                                                               ("ARCHIVED", None)]
    assert outbox_rows(engine) == events  # no second event row
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM inbox WHERE message_id IN ('send-1', 'archive-1')")
                            ).scalar_one() == 2

    # a consent withdrawal replayed after consent was given again must not purge a second time
    ok(remove_care_copy(engine, body))
    withdrawn = give_consent_with_id(engine, PATIENT, False, "consent-off-1")
    assert ok(withdrawn) == {"purged": 1}
    ok(give_consent(engine, PATIENT))
    assert give_consent_with_id(engine, PATIENT, False, "consent-off-1") == withdrawn
    assert ok(handle(engine, "consent.get", {"patient_id": PATIENT}))["given"] is True


def give_consent_with_id(engine, patient_id: str, given: bool, message_id: str) -> dict[str, Any]:
    return handle(engine, "consent.set", {"patient_id": patient_id, "given": given}, message_id=message_id)


# --- concurrency ------------------------------------------------------------------------------------------------
def run_together(*actions) -> list[Any]:
    """Start every action in its own thread at the same moment; their results (or raise the first error)."""
    barrier = threading.Barrier(len(actions))
    results: list[Any] = [None] * len(actions)
    errors: list[BaseException] = []

    def run(i, action):
        try:
            barrier.wait(5)
            results[i] = action()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(actions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


def run_overlapping(engine, first: tuple[str, dict], second: tuple[str, dict]) -> tuple[dict, dict]:
    """`first` is processed and kept uncommitted while `second` starts in another thread; `first` commits only
    after `second` had time to run into it. Checks that `second` started before that commit and could not finish
    before it (it had to wait for `first`'s locks); returns both replies."""
    started, replies, times = threading.Event(), {}, {}

    def hold():
        parsed = parse(envelope(*first), POLICY)
        with SqlUnitOfWork(engine) as uow:
            replies["first"] = process(parsed, uow, POLICY).reply.model_dump(mode="json")
            started.set()
            time.sleep(0.5)
            times["committed"] = time.monotonic()
            uow.commit()

    def follow():
        started.wait(5)
        times["begun"] = time.monotonic()
        replies["second"] = handle(engine, *second)
        times["finished"] = time.monotonic()

    run_together(hold, follow)
    assert times["begun"] < times["committed"] < times["finished"]
    return replies["first"], replies["second"]


def _send_body(body):
    return {"certificate_id": body["id"], "patient_id": body["patient_id"], "recipient_id": "FKASSA",
            "sent_by": "CITIZEN", "care_giver_id": None}


def _archive_body(body):
    return {"certificate_id": body["id"], "patient_id": body["patient_id"], "status": "ARCHIVED"}


def test_send_and_archive_of_one_certificate_at_once_both_land(engine):
    ok(give_consent(engine, PATIENT))
    # an archive that runs into an uncommitted send waits for it, then adds its own change
    body = register(engine)
    sent, archived = run_overlapping(engine, ("certificate.send", _send_body(body)),
                                     ("certificate.set-status", _archive_body(body)))
    assert sent["result"] == archived["result"] == "OK"
    assert stored_statuses(engine, body["id"]) == [("RECEIVED", None), ("SENT", "FKASSA"), ("ARCHIVED", None)]
    # and the other way round
    body = register(engine)
    archived, sent = run_overlapping(engine, ("certificate.set-status", _archive_body(body)),
                                     ("certificate.send", _send_body(body)))
    assert sent["result"] == archived["result"] == "OK"
    assert stored_statuses(engine, body["id"]) == [("RECEIVED", None), ("ARCHIVED", None), ("SENT", "FKASSA")]
    assert row_of(engine, body["id"]).archived is True

    # truly at once, many times
    for _ in range(15):
        body = register(engine)
        sent, archived = run_together(lambda: send(engine, body), lambda: set_status(engine, body, "ARCHIVED"))
        assert sent["result"] == archived["result"] == "OK", (sent, archived)
        statuses = stored_statuses(engine, body["id"])
        assert sorted(statuses, key=str) == sorted([("RECEIVED", None), ("SENT", "FKASSA"), ("ARCHIVED", None)],
                                                   key=str)
        got = ok(citizen_get(engine, body))
        assert got["archived"] is True and got["sent_to"] == ["FKASSA"]
        keys = [key for key, _ in events_of(engine, body["id"])]
        assert sorted(keys) == sorted(["certificate.registered", "certificate.sent",
                                       "recipient.FKASSA.certificate.sent", "certificate.archived"])
        assert keys.index("certificate.sent") + 1 == keys.index("recipient.FKASSA.certificate.sent")


def test_removing_the_care_copy_while_consent_is_withdrawn_never_leaves_an_orphan(engine):
    """The rule: no certificate without a care copy and without consent. Whichever of the two commands wins the
    patient, the certificate ends up purged."""
    remove = lambda body: ("certificate.remove-care-copy", {"certificate_id": body["id"], "care_giver_id": GIVER,
                                                                **BY})  # noqa: E731
    withdraw = lambda body: ("consent.set", {"patient_id": body["patient_id"], "given": False})  # noqa: E731

    def fresh(serial: int) -> dict[str, Any]:
        patient = factories.personnummer(dt.date(1980, 1, 1) + dt.timedelta(days=serial), 100 + serial)
        assert pnr.valid(patient)
        ok(give_consent(engine, patient))
        return register(engine, patient_id=patient)

    def check(body, removed_reply, withdrawn_reply):
        outcome, purged = ok(removed_reply)["outcome"], ok(withdrawn_reply)["purged"]
        assert (outcome, purged) in {("CITIZEN_ONLY", 1), ("PURGED", 0)}, (removed_reply, withdrawn_reply)
        assert row_of(engine, body["id"]) is None
        assert tombstone_of(engine, body["id"]) in {"CONSENT_WITHDRAWN", "CARE_COPY_REMOVED_WITHOUT_CONSENT"}

    body = fresh(0)  # removal holds the patient; the withdrawal waits, then purges what is left
    removed, withdrawn = run_overlapping(engine, remove(body), withdraw(body))
    assert ok(removed) == {"outcome": "CITIZEN_ONLY"} and ok(withdrawn) == {"purged": 1}
    check(body, removed, withdrawn)

    body = fresh(1)  # withdrawal holds the patient; the removal waits, then finds no consent
    withdrawn, removed = run_overlapping(engine, withdraw(body), remove(body))
    assert ok(removed) == {"outcome": "PURGED"} and ok(withdrawn) == {"purged": 0}
    check(body, removed, withdrawn)

    for serial in range(2, 22):
        body = fresh(serial)
        removed, withdrawn = run_together(lambda: handle(engine, *remove(body)),
                                          lambda: handle(engine, *withdraw(body)))
        check(body, removed, withdrawn)
    with engine.connect() as conn:
        orphans = conn.execute(text(
            "SELECT count(*) FROM certificates c LEFT JOIN consents k ON k.patient_id = c.patient_id "
            "WHERE NOT c.available_to_care AND NOT coalesce(k.given, false)")).scalar_one()
    assert orphans == 0


# --- the access log (CONTRACT §9) ---------------------------------------------------------------------------------
NURSE = {"person_id": "SE2321000016-7777", "name": "Sköterska Stina", "care_unit_id": UNIT_2}


def access_entries(engine, certificate_id: str | None = None) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        query = select(access_log).order_by(access_log.c.at, access_log.c.message_id, access_log.c.certificate_id)
        if certificate_id is not None:
            query = query.where(access_log.c.certificate_id == certificate_id)
        return [dict(r._mapping) for r in conn.execute(query)]


def access_published(engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.exchange, outbox.c.message_id, outbox.c.body)
                            .where(outbox.c.routing_key == ACCESS_LOGGED).order_by(outbox.c.id)).all()
    bodies = [json.loads(bytes(r.body)) for r in rows]
    assert all(r.exchange == "intyg.events" and r.message_id == b["event_id"] for r, b in zip(rows, bodies))
    return bodies


def _care_messages(body: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each care action of §9 on the registered certificate `body`, by its action."""
    cid, giver = body["id"], body["issued_by"]["care_giver"]["id"]
    return {
        "READ": ("certificate.get-for-care", {"certificate_id": cid, "care_giver_id": giver}),
        "LIST": ("certificate.list-for-care", {"patient_id": PATIENT, "care_giver_id": giver, "care_unit_ids": [UNIT]}),
        "REVOKE": ("certificate.revoke", {"certificate_id": cid, "patient_id": PATIENT,
                                          "revoked_by": {"person_id": NURSE["person_id"], "name": "Stina"}}),
        "REMOVE_CARE_COPY": ("certificate.remove-care-copy", {"certificate_id": cid, "care_giver_id": giver}),
        "SEND": ("certificate.send", {"certificate_id": cid, "patient_id": PATIENT, "recipient_id": "FKASSA",
                                      "sent_by": "CARE", "care_giver_id": giver}),
    }


@pytest.mark.parametrize("action", ["READ", "LIST", "REVOKE", "REMOVE_CARE_COPY", "SEND"])
def test_each_care_action_is_logged_with_its_reader_in_the_transaction_of_the_answer(engine, action):
    body = register(engine)
    routing_key, message = _care_messages(body)[action]
    parsed = parse(envelope(routing_key, {**message, "accessed_by": NURSE}, "care-1"), POLICY)
    with SqlUnitOfWork(engine) as uow:
        assert process(parsed, uow, POLICY).reply.result.value == "OK"
        uow.flush()
        assert access_entries(engine) == [] and access_published(engine) == []  # not before the commit ...
        uow.commit()
    [entry] = access_entries(engine)  # ... and then together with the answer
    assert entry["at"] is not None and entry["message_id"] == "care-1"
    del entry["at"], entry["message_id"]
    assert entry == {"action": action, "certificate_id": body["id"], "certificate_type": "lisjp",
                     "patient_id": PATIENT, "care_giver_id": GIVER, "person_id": NURSE["person_id"],
                     "person_name": "Sköterska Stina", "care_unit_id": UNIT_2}
    [published] = access_published(engine)
    assert {k: published[k] for k in entry} == entry and published["type"] == ACCESS_LOGGED


def test_a_care_giver_leaving_logs_every_certificate_of_every_batch(engine):
    ids = {register(engine)["id"] for _ in range(5)}
    handle(engine, "care-giver.remove-care-copies", {"care_giver_id": GIVER, **BY},
           policy=Policy(catalogue=CATALOGUE, bulk_batch_size=2))
    assert {e["certificate_id"] for e in access_entries(engine)} == ids and len(access_entries(engine)) == 5
    assert {e["action"] for e in access_entries(engine)} == {"REMOVE_CARE_COPY"}
    assert len(access_published(engine)) == 5


def test_a_redelivered_query_logs_and_publishes_nothing_twice(engine):
    body = register(engine)
    message = {"certificate_id": body["id"], "care_giver_id": GIVER, **BY}
    for _ in range(2):  # queries are not kept in the inbox: the same message_id is answered again
        ok(handle(engine, "certificate.get-for-care", message, message_id="read-once"))
    assert len(access_entries(engine)) == 1 and len(access_published(engine)) == 1
    ok(handle(engine, "certificate.get-for-care", message))  # another read is another entry
    assert len(access_entries(engine)) == 2


def test_a_care_list_logs_what_it_returned_and_an_empty_one_nothing(engine):
    bodies = [register(engine, signed_at=f"2026-11-0{n + 1}T10:00:00+01:00") for n in range(3)]
    page = care_list(engine, PATIENT, GIVER, [UNIT], page_size=2)
    assert {e["certificate_id"] for e in access_entries(engine)} == {c["id"] for c in page["certificates"]} == {
        bodies[2]["id"], bodies[1]["id"]}
    assert care_list(engine, OTHER_PATIENT, GIVER, [UNIT])["certificates"] == []
    assert care_list(engine, PATIENT, GIVER, [UNIT_3])["certificates"] == []
    assert len(access_entries(engine)) == 2


def test_the_entries_of_a_purged_certificate_remain(engine):
    body = register(engine)
    ok(handle(engine, "certificate.get-for-care", {"certificate_id": body["id"], "care_giver_id": GIVER, **BY}))
    assert ok(remove_care_copy(engine, body)) == {"outcome": "PURGED"}
    assert_purged(engine, body, "CARE_COPY_REMOVED_WITHOUT_CONSENT")
    assert [e["action"] for e in access_entries(engine, body["id"])] == ["READ", "REMOVE_CARE_COPY"]
    listed = ok(handle(engine, "access-log.list", {"patient_id": PATIENT}))["entries"]
    assert [(e["action"], e["certificate_id"]) for e in listed] == [("REMOVE_CARE_COPY", body["id"]),
                                                                    ("READ", body["id"])]


def _backdate(engine, certificate_id: str, at: dt.datetime) -> None:
    with engine.begin() as conn:
        conn.execute(access_log.update().where(access_log.c.certificate_id == certificate_id).values(at=at))


def test_retention_removes_only_entries_older_than_the_cutoff_in_batches(engine):
    retention = Retention(access_log_retention=dt.timedelta(days=3653))
    cutoff = dt.datetime.now(dt.UTC) - retention.access_log_retention
    old, kept = [register(engine) for _ in range(5)], register(engine)
    for body in [*old, kept]:
        ok(handle(engine, "certificate.get-for-care", {"certificate_id": body["id"], "care_giver_id": GIVER, **BY}))
    for n, body in enumerate(old):
        _backdate(engine, body["id"], cutoff - dt.timedelta(days=n + 1))
    _backdate(engine, kept["id"], cutoff + dt.timedelta(days=1))  # not old enough yet: kept
    with engine.connect() as conn:
        assert [delete_batch(conn, "access_log", retention, batch=2) for _ in range(4)] == [2, 2, 1, 0]
    assert [e["certificate_id"] for e in access_entries(engine)] == [kept["id"]]


def test_the_patient_reads_the_log_newest_first_by_swedish_day_in_pages(engine):
    bodies = [register(engine) for _ in range(3)]
    for body in bodies:
        ok(handle(engine, "certificate.get-for-care", {"certificate_id": body["id"], "care_giver_id": GIVER, **BY}))
    other = register(engine, patient_id=OTHER_PATIENT)
    ok(handle(engine, "certificate.get-for-care", {"certificate_id": other["id"], "care_giver_id": GIVER, **BY}))
    days = [dt.datetime(2026, 11, 30, 23, 30, tzinfo=dt.UTC),  # 1 December 00:30 in Stockholm
            dt.datetime(2026, 11, 30, 22, 59, tzinfo=dt.UTC),  # 30 November 23:59
            dt.datetime(2026, 12, 1, 22, 59, tzinfo=dt.UTC)]  # 1 December 23:59
    for body, at in zip(bodies, days):
        _backdate(engine, body["id"], at)

    def listed(**query) -> dict[str, Any]:
        return ok(handle(engine, "access-log.list", {"patient_id": PATIENT, **query}))

    first = listed(page_size=2)
    assert [e["certificate_id"] for e in first["entries"]] == [bodies[2]["id"], bodies[0]["id"]]
    rest = listed(page_size=2, page_token=first["next_page_token"])
    assert [e["certificate_id"] for e in rest["entries"]] == [bodies[1]["id"]] and rest["next_page_token"] is None
    assert [e["certificate_id"] for e in listed(**{"from": "2026-12-01", "to": "2026-12-01"})["entries"]] == [
        bodies[2]["id"], bodies[0]["id"]]
    assert [e["certificate_id"] for e in listed(to="2026-11-30")["entries"]] == [bodies[1]["id"]]
    assert not {e["patient_id"] for e in listed()["entries"]} - {PATIENT}
