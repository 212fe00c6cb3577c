"""The queries (CONTRACT.md §6): the citizen's get/list (slide 4), care's get/list (slide 5), consent, recipients,
and the citizen's access log (§9). They take no locks and change nothing but the access log: care's reads are
logged in the transaction of the answer."""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from collections.abc import Callable
from typing import TypeVar

from contracts.queries import (GetCertificate, GetCertificateForCare, GetConsent, ListAccessLog, ListCertificates,
                               ListCertificatesForCare, ListRecipients)
from contracts.replies import Reply
from consumers.access_log import record, wire_entry
from consumers.context import Context, Handled
from consumers.wire import stored_for_care, stored_for_citizen
from domain import lifecycle
from domain.access import LIST, READ
from domain.errors import Refused
from domain.model import HIDDEN_FROM_CITIZEN, Certificate
from domain.ports import AccessFilter, AccessKey, CitizenFilter, PageKey, UnitOfWork

T = TypeVar("T")

_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # a certificate id (CONTRACT §4)
_MESSAGE_ID = re.compile(r"[^\x00]{1,128}")  # a message id (CONTRACT §2)


def get_certificate(message: GetCertificate, uow: UnitOfWork, ctx: Context) -> Handled:
    consent = uow.consents.get(message.patient_id)
    certificate = lifecycle.citizen_get(uow.certificates.get(message.certificate_id, with_document=True), consent)
    return _ok(ctx, stored_for_citizen(certificate, with_document=True))


def list_certificates(message: ListCertificates, uow: UnitOfWork, ctx: Context) -> Handled:
    lifecycle.require_consent(uow.consents.get(message.patient_id))
    query = CitizenFilter(patient_id=message.patient_id, archived=message.archived, types=frozenset(message.types),
                          hidden_types=HIDDEN_FROM_CITIZEN, signed_from=message.signed_from,
                          signed_to=message.signed_to)
    page = uow.certificates.list_for_citizen(query, _page_key(message.page_token), message.page_size + 1)
    return _page(ctx, page, message.page_size, lambda c: stored_for_citizen(c, with_document=False))


def get_certificate_for_care(message: GetCertificateForCare, uow: UnitOfWork, ctx: Context) -> Handled:
    certificate = lifecycle.care_get(uow.certificates.get(message.certificate_id, with_document=True),
                                     message.care_giver_id)
    record(uow, ctx, READ, [certificate], message.accessed_by)
    return _ok(ctx, stored_for_care(certificate, with_document=True))


def list_certificates_for_care(message: ListCertificatesForCare, uow: UnitOfWork, ctx: Context) -> Handled:
    page = uow.certificates.list_for_care(message.patient_id, message.care_giver_id,
                                          frozenset(message.care_unit_ids), _page_key(message.page_token),
                                          message.page_size + 1)
    record(uow, ctx, LIST, page[:message.page_size], message.accessed_by)  # what it returns, nothing if empty
    return _page(ctx, page, message.page_size, lambda c: stored_for_care(c, with_document=False))


def get_consent(message: GetConsent, uow: UnitOfWork, ctx: Context) -> Handled:
    consent = uow.consents.get(message.patient_id)
    changed_at = consent.changed_at.isoformat() if consent.changed_at else None
    return _ok(ctx, {"given": consent.given, "changed_at": changed_at})


def list_recipients(message: ListRecipients, uow: UnitOfWork, ctx: Context) -> Handled:
    recipients = [
        {"id": r.id, "name": r.name, "certificate_types": sorted(r.certificate_types), "trusted": r.trusted,
         "active": r.active}
        for r in ctx.catalogue.recipients.values()
        if message.certificate_type is None or message.certificate_type in r.certificate_types
    ]
    return _ok(ctx, {"recipients": recipients})


def list_access_log(message: ListAccessLog, uow: UnitOfWork, ctx: Context) -> Handled:
    """§9: who in care accessed the patient's certificates, newest first. No consent needed: the patient's right
    to know who read the records does not depend on using the portal's copies."""
    query = AccessFilter(message.patient_id, message.from_, message.to)
    after = _decode(message.page_token, _access_position)
    rows = uow.access_log.list_for_patient(query, after, message.page_size + 1)
    shown = rows[:message.page_size]
    token = None
    if len(rows) > message.page_size:
        last = shown[-1]
        token = _encode({"a": last.at.isoformat(), "m": last.message_id, "c": last.certificate_id})
    return _ok(ctx, {"entries": [wire_entry(e) for e in shown], "next_page_token": token})


def _ok(ctx: Context, data: dict) -> Handled:
    return Handled(Reply.ok(ctx.request_id, "OK", data))


def _page(ctx: Context, rows, page_size: int, render) -> Handled:
    """One row more than asked for tells whether a next page exists, without counting."""
    shown: list[Certificate] = list(rows[:page_size])
    token = _page_token(shown[-1]) if len(rows) > page_size else None
    return _ok(ctx, {"certificates": [render(c) for c in shown], "next_page_token": token})


def _page_token(last: Certificate) -> str:
    return _encode({"s": last.signed_at.isoformat(), "i": last.id})


def _page_key(token: str | None) -> PageKey | None:
    """A token is the client's to tamper with: it must hold exactly what `_page_token` put there, or it never
    reaches the database (a NUL or a number where an id belongs would be a database error, not an answer)."""
    return _decode(token, _certificate_position)


def _certificate_position(raw: dict) -> PageKey:
    signed_at, certificate_id = dt.datetime.fromisoformat(raw["s"]), raw["i"]
    if signed_at.tzinfo is None or not isinstance(certificate_id, str) or not _ID.fullmatch(certificate_id):
        raise ValueError("not a page key")
    return PageKey(signed_at, certificate_id)


def _access_position(raw: dict) -> AccessKey:
    """The same care for the access log's tokens (`list_access_log`)."""
    at, message_id, certificate_id = dt.datetime.fromisoformat(raw["a"]), raw["m"], raw["c"]
    if at.tzinfo is None or not isinstance(certificate_id, str) or not _ID.fullmatch(certificate_id) \
            or not isinstance(message_id, str) or not _MESSAGE_ID.fullmatch(message_id):
        raise ValueError("not a page key")
    return AccessKey(at, message_id, certificate_id)


def _encode(position: dict[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


def _decode(token: str | None, key: Callable[[dict], T]) -> T | None:
    if token is None:
        return None
    try:
        return key(json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))))
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise Refused("INVALID_MESSAGE", "page_token is not a token this service gave out") from None
