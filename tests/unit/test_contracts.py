"""The wire shapes (CONTRACT §2-§4, §7): strict models, normalised patient ids, bounded sizes, JSON Schemas."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from consumers.pipeline import Envelope, Invalid, parse
from contracts.certificate import Certificate
from contracts.registry import COMMANDS, EVENTS, MESSAGES, QUERIES, json_schemas
from contracts.replies import Code, ErrorId, Reply, Result

from .harness import factories, policy

PATIENT = factories.PATIENT
REVOKED_BY = {"person_id": "SE2321000016-1003", "name": "Ajla Doktor"}
ACCESSED_BY = factories.ACCESSED_BY

VALID: dict[str, dict] = {
    "certificate.register": {"certificate": factories.certificate_json()},
    "certificate.revoke": {"certificate_id": "c1", "patient_id": PATIENT, "revoked_by": REVOKED_BY, "reason": None,
                           "accessed_by": ACCESSED_BY},
    "certificate.remove-care-copy": {"certificate_id": "c1", "care_giver_id": factories.CARE_GIVER,
                                     "accessed_by": ACCESSED_BY},
    "care-giver.remove-care-copies": {"care_giver_id": factories.CARE_GIVER, "accessed_by": ACCESSED_BY},
    "certificate.set-status": {"certificate_id": "c1", "patient_id": PATIENT, "status": "ARCHIVED"},
    "certificate.send": {"certificate_id": "c1", "patient_id": PATIENT, "recipient_id": "FKASSA",
                         "sent_by": "CITIZEN", "care_giver_id": None},
    "consent.set": {"patient_id": PATIENT, "given": True},
    "certificate.get": {"certificate_id": "c1", "patient_id": PATIENT},
    "certificate.list": {"patient_id": PATIENT, "archived": False, "types": [], "signed_from": None,
                         "signed_to": None, "page_size": 100, "page_token": None},
    "certificate.get-for-care": {"certificate_id": "c1", "care_giver_id": factories.CARE_GIVER,
                                 "accessed_by": ACCESSED_BY},
    "certificate.list-for-care": {"patient_id": PATIENT, "care_giver_id": factories.CARE_GIVER,
                                  "care_unit_ids": [factories.CARE_UNIT], "page_size": 10, "page_token": None,
                                  "accessed_by": ACCESSED_BY},
    "consent.get": {"patient_id": PATIENT},
    "recipient.list": {"certificate_type": None},
    "access-log.list": {"patient_id": PATIENT, "from": "2026-11-01", "to": None, "page_size": 100,
                        "page_token": None},
}


def parsed(routing_key: str, body, **properties):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    properties.setdefault("reply_to", "reply-queue")
    return parse(Envelope(routing_key=routing_key, body=raw, message_id="m-1", **properties), policy())


def invalid(routing_key: str, body, **properties) -> Invalid:
    with pytest.raises(Invalid) as raised:
        parsed(routing_key, body, **properties)
    return raised.value


def test_every_message_type_has_a_valid_example():
    assert set(VALID) == set(MESSAGES) == set(COMMANDS) | set(QUERIES)
    for routing_key, body in VALID.items():
        assert parsed(routing_key, body).route.model is MESSAGES[routing_key]


@pytest.mark.parametrize("routing_key", sorted(VALID))
def test_unknown_field_is_rejected(routing_key):
    error = invalid(routing_key, {**VALID[routing_key], "colour": "blue"})
    assert error.code == Code.INVALID_MESSAGE and "colour" in error.message


def test_unknown_field_deep_inside_the_certificate_is_rejected():
    certificate = factories.certificate_json()
    certificate["issued_by"]["care_unit"]["colour"] = "blue"
    error = invalid("certificate.register", {"certificate": certificate})
    assert error.code == Code.INVALID_MESSAGE and "certificate.issued_by.care_unit.colour" in error.message


def test_missing_field_is_named():
    body = dict(VALID["certificate.send"])
    del body["recipient_id"]
    error = invalid("certificate.send", body)
    assert error.code == Code.INVALID_MESSAGE and "recipient_id" in error.message


@pytest.mark.parametrize(("written", "stored"), [("191212121212", "191212121212"), ("19121212-1212", "191212121212"),
                                                  ("191212721219", "191212721219"), ("19121272-1219", "191212721219")])
def test_personnummer_and_samordningsnummer_are_stored_as_12_digits(written, stored):
    assert parsed("consent.set", {"patient_id": written, "given": True}).message.patient_id == stored
    register = parsed("certificate.register", {"certificate": factories.certificate_json(patient_id=written)})
    assert register.message.certificate.patient_id == stored


@pytest.mark.parametrize("wrong", [
    "191212121213",  # check digit
    "19121212-1213",
    "191213321212",  # no 32nd day, not even as samordningsnummer (92)
    "191212921212",  # day 92: not a samordningsnummer either
    "1212121212",  # ten digits: the century is required
    "121212-1212",
    "19121212+1212",
    "19121212--1212",
    "191212121212\n",
    "١٩١٢١٢١٢١٢١٢",  # Arabic-Indic digits
    "19121212121212",  # too long
    "",
])
def test_wrong_personnummer_is_invalid_personnummer_and_never_echoed(wrong):
    error = invalid("consent.set", {"patient_id": wrong, "given": True})
    assert error.code == Code.INVALID_PERSONNUMMER
    assert wrong.strip() not in error.message or not wrong.strip()
    nested = invalid("certificate.register", {"certificate": factories.certificate_json(patient_id=wrong)})
    assert nested.code == Code.INVALID_PERSONNUMMER


def test_a_wrong_personnummer_among_other_mistakes_is_an_invalid_message():
    error = invalid("certificate.set-status", {"certificate_id": "c1", "patient_id": "191212121213",
                                               "status": "LOST"})
    assert error.code == Code.INVALID_MESSAGE and "191212121213" not in error.message


@pytest.mark.parametrize("bad_id", ["", "a b", "å", "a/b", "a#b", "x" * 65, "a\n", "ab\u200b"])
def test_bad_certificate_id_is_rejected(bad_id):
    for routing_key, body in (("certificate.get", {**VALID["certificate.get"], "certificate_id": bad_id}),
                              ("certificate.register", {"certificate": factories.certificate_json(id=bad_id)}),
                              ("certificate.register", {"certificate": factories.certificate_json(
                                  relations=[{"code": "ERSATT", "certificate_id": bad_id}])})):
        assert invalid(routing_key, body).code == Code.INVALID_MESSAGE


@pytest.mark.parametrize("good_id", ["a", "A.b_c:d-9", "x" * 64, "9f02dd2f-f57c-4c23-b4d0-3a7a6a1b9c11"])
def test_good_certificate_ids_are_accepted(good_id):
    assert parsed("certificate.get", {**VALID["certificate.get"], "certificate_id": good_id}).message


@pytest.mark.parametrize(("routing_key", "field", "too_much"), [
    ("certificate.remove-care-copy", "care_giver_id", "H" * 65),
    ("certificate.remove-care-copy", "care_giver_id", "SE 1"),  # HSA ids have no whitespace
    ("certificate.remove-care-copy", "care_giver_id", ""),
    ("certificate.revoke", "reason", "r" * 2001),
    ("certificate.revoke", "revoked_by", {"person_id": "SE-1", "name": "n" * 257}),
    ("certificate.list", "page_size", 0),
    ("certificate.list", "page_size", 1001),
    ("certificate.list", "page_token", "t" * 513),
    ("certificate.list", "types", ["lisjp"] * 101),
    ("certificate.list-for-care", "care_unit_ids", []),
    ("certificate.list-for-care", "care_unit_ids", ["VE"] * 1001),
    ("certificate.send", "recipient_id", "R" * 65),
])
def test_sizes_are_bounded(routing_key, field, too_much):
    assert invalid(routing_key, {**VALID[routing_key], field: too_much}).code == Code.INVALID_MESSAGE


@pytest.mark.parametrize(("field", "value"), [
    ("relations", [{"code": "ERSATT", "certificate_id": "x"}] * 101),
    ("relations", [{"code": "NEW", "certificate_id": "x"}]),
    ("type_version", ""),
    ("type_version", "v" * 33),
    ("signed_at", "2026-11-25T09:30:00"),  # no offset
    ("signed_at", "25/11/2026"),
    ("signed_at", "0001-01-01T00:00:00+14:00"),  # the year 0 in UTC: stored, but never loaded again
    ("signed_at", "9999-12-31T23:59:59-12:00"),  # the year 10,000 in UTC
    ("valid_from", "2026-13-01"),
    ("valid_to", "2026-11-01"),  # before valid_from
    ("document", {"media_type": "application/pdf", "encoding": "base64", "content": "not base64!"}),
    ("document", {"media_type": "application/pdf", "encoding": "latin-1", "content": "x"}),
    ("document", {"media_type": "", "content": "x"}),
    ("issued_by", factories.issued_by(care_giver_id="has space")),
    ("test_certificate", "yes"),
])
def test_certificate_shape_is_checked(field, value):
    body = {"certificate": factories.certificate_json(**{field: value})}
    assert invalid("certificate.register", body).code == Code.INVALID_MESSAGE


def test_certificate_defaults_and_optional_fields():
    minimal = factories.certificate_json(valid_from=None, valid_to=None)
    for key in ("test_certificate", "relations", "valid_from", "valid_to"):
        minimal.pop(key)
    minimal["document"].pop("encoding")
    certificate = Certificate.model_validate(minimal)
    assert (certificate.test_certificate, certificate.relations, certificate.document.encoding) == (False, [],
                                                                                                  "utf-8")


def test_body_size_is_bounded_by_configuration():
    body = json.dumps(VALID["consent.set"]).encode()
    small = policy(max_body_bytes=len(body) - 1)
    with pytest.raises(Invalid) as raised:
        parse(Envelope("consent.set", body, message_id="m"), small)
    assert raised.value.code == Code.INVALID_MESSAGE
    assert parse(Envelope("consent.set", body, message_id="m"), policy(max_body_bytes=len(body))).message


@pytest.mark.parametrize("message_id", [None, "", "m" * 129])
def test_message_id_is_required_and_bounded(message_id):
    with pytest.raises(Invalid):
        parse(Envelope("consent.get", b"{}", message_id=message_id, reply_to="r"), policy())
    assert parse(Envelope("consent.set", json.dumps(VALID["consent.set"]).encode(), message_id="m" * 128), policy())


@pytest.mark.parametrize("content_type", [None, "", "application/json"])
def test_content_type_json_or_absent(content_type):
    assert parsed("consent.get", VALID["consent.get"], content_type=content_type)


def test_other_content_type_is_invalid():
    assert invalid("consent.get", VALID["consent.get"], content_type="text/xml").code == Code.INVALID_MESSAGE


def test_type_property_must_equal_the_routing_key():
    assert parsed("consent.get", VALID["consent.get"], type="consent.get")
    assert invalid("consent.get", VALID["consent.get"], type="consent.set").code == Code.INVALID_MESSAGE


def test_json_schema_is_generated_for_every_message_type():
    schemas = json_schemas()
    expected = set(MESSAGES) | {k.replace("{recipient_id}", "R") for k in EVENTS} | {"reply", "stored-certificate"}
    assert set(schemas) == expected
    for name, schema in schemas.items():
        assert schema["type"] == "object", name
        assert schema.get("additionalProperties") is False, name  # unknown fields rejected, and said so
        json.dumps(schema)
    patient = schemas["consent.set"]["properties"]["patient_id"]
    assert patient["maxLength"] == 13
    assert schemas["certificate.register"]["$defs"]["Certificate"]["properties"]["id"]["maxLength"] == 64


@pytest.mark.parametrize("code", list(Code))
def test_reply_for_each_code_follows_the_contract_table(code):
    reply = Reply.for_code(code, "r-1", "text")
    if code in (Code.ALREADY_EXISTS, Code.ALREADY_REVOKED, Code.ALREADY_SENT, Code.NO_CHANGE):
        assert (reply.result, reply.error_id) == (Result.INFO, None)
    else:
        expected = {Code.INVALID_MESSAGE: "VALIDATION_ERROR", Code.INVALID_PERSONNUMMER: "VALIDATION_ERROR",
                    Code.UNKNOWN_CERTIFICATE_TYPE: "VALIDATION_ERROR", Code.CONFLICT: "VALIDATION_ERROR",
                    Code.TEST_CERTIFICATE: "VALIDATION_ERROR", Code.REVOKED: "REVOKED",
                    Code.UNAVAILABLE: "TECHNICAL_ERROR"}.get(code, "APPLICATION_ERROR")
        assert (reply.result, reply.error_id) == (Result.ERROR, ErrorId(expected))
    assert json.loads(reply.model_dump_json()).keys() == {"result", "error_id", "code", "message", "request_id",
                                                          "data"}


@pytest.mark.parametrize("text", ["patient 191212121212 is odd", "19121212-1212", "121212-1212 x", "1212121212"])
def test_a_reply_message_never_contains_a_personnummer(text):
    message = Reply.for_code(Code.NOT_FOUND, "r", text).message
    assert "1212121212" not in message.replace("-", "") and "[personnummer]" in message


def test_a_reply_message_keeps_other_numbers():
    text = "body is larger than 4194304 bytes; 12 certificates"
    assert Reply.for_code(Code.INVALID_MESSAGE, "r", text).message == text


def test_events_are_strict_too():
    model = EVENTS["certificate.archived"]
    event = {"event_id": "e", "type": "certificate.archived", "occurred_at": "2026-11-25T12:00:00Z",
             "certificate_id": "c1"}
    assert model.model_validate(event)
    with pytest.raises(ValidationError):
        model.model_validate({**event, "patient_id": PATIENT})


@pytest.mark.parametrize(("routing_key", "field", "value"), [
    ("consent.set", "given", "no"),  # would withdraw consent and purge if read as False
    ("consent.set", "given", 0),
    ("certificate.list", "page_size", "10"),
    ("certificate.list", "page_size", 10.5),
    ("certificate.list", "archived", "true"),
    ("certificate.get", "certificate_id", 12345),
])
def test_json_types_are_not_coerced(routing_key, field, value):
    assert invalid(routing_key, {**VALID[routing_key], field: value}).code == Code.INVALID_MESSAGE


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'"text"', b"null", b"", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_invalid(body):
    error = invalid("consent.get", body)
    assert error.code == Code.INVALID_MESSAGE and error.message == "body is not a JSON object"


def test_the_first_and_last_instants_the_store_holds_are_accepted():
    for signed_at in ("0001-01-01T00:00:00+00:00", "0001-01-01T14:00:00+14:00", "9999-12-31T23:59:59.999999+00:00"):
        body = {"certificate": factories.certificate_json(signed_at=signed_at)}
        assert parsed("certificate.register", body).message.certificate.signed_at
