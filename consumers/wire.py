"""Between the wire and the rules: contract models to domain objects, and domain facts to replies and events."""
from __future__ import annotations

import uuid
from typing import Any

from contracts import events as wire
from contracts.certificate import Certificate as WireCertificate
from contracts.replies import Code, Reply
from contracts.topology import recipient_routing_key
from domain import events
from domain.errors import Refused
from domain.lifecycle import Outcome
from domain.model import Certificate


def certificate_from_wire(certificate: WireCertificate) -> Certificate:
    content = certificate.model_dump(mode="json")
    document = content.pop("document")
    return Certificate(
        id=certificate.id,
        type=certificate.type,
        patient_id=certificate.patient_id,
        care_giver_id=certificate.issued_by.care_giver.id,
        care_unit_id=certificate.issued_by.care_unit.id,
        signed_at=certificate.signed_at,
        test_certificate=certificate.test_certificate,
        fingerprint=None,  # computed if the id turns out to be taken (`Certificate.content_fingerprint`)
        content=content,
        document=document,
    )


def whole_certificate(certificate: Certificate) -> dict[str, Any]:
    """The certificate as care registered it, document included (what a recipient receives)."""
    return {**certificate.content, "document": certificate.document}


def stored_for_citizen(certificate: Certificate, *, with_document: bool) -> dict[str, Any]:
    view = _stored(certificate, certificate.statuses, with_document)
    view["archived"] = certificate.archived
    view["available_to_care"] = certificate.available_to_care
    return view


def stored_for_care(certificate: Certificate, *, with_document: bool) -> dict[str, Any]:
    return _stored(certificate, certificate.statuses_for_care(), with_document)


def _stored(certificate: Certificate, statuses: list, with_document: bool) -> dict[str, Any]:
    view = dict(certificate.content)
    if with_document:
        view["document"] = certificate.document
    view["revoked"] = certificate.revoked
    view["revoked_at"] = certificate.revoked_at.isoformat() if certificate.revoked_at else None
    view["sent_to"] = certificate.sent_to
    view["statuses"] = [{"status": s.status, "target": s.target, "at": s.at.isoformat()} for s in statuses]
    return view


def reply_for(outcome: Outcome, request_id: str) -> Reply:
    if outcome.info:
        return Reply.for_code(Code(outcome.info), request_id, outcome.message, outcome.data)
    return Reply.ok(request_id, outcome.message, outcome.data)


def reply_for_refusal(refusal: Refused, request_id: str) -> Reply:
    return Reply.for_code(Code(refusal.code), request_id, refusal.message)


def wire_events(facts: list[Any], occurred_at) -> list[wire.Event]:
    """Broadcast events carry no patient id and no document; recipients get what they need, never for tests."""
    out: list[wire.Event] = []
    for fact in facts:
        out.extend(_wire_event(fact, occurred_at))
    return out


def _wire_event(fact: Any, at) -> list[wire.Event]:
    def make(model: type[wire.Event], routing_key: str | None = None, **fields: Any) -> wire.Event:
        key = routing_key or model.ROUTING_KEY
        return model(event_id=str(uuid.uuid4()), type=key, occurred_at=at, **fields)

    match fact:
        case events.Registered(certificate=c):
            return [make(wire.CertificateRegistered, certificate_id=c.id, certificate_type=c.type,
                         care_unit_id=c.care_unit_id, care_giver_id=c.care_giver_id, signed_at=c.signed_at,
                         test_certificate=c.test_certificate)]
        case events.Revoked(certificate=c, reason=reason, sent_to=recipients):
            return [make(wire.CertificateRevoked, certificate_id=c.id, certificate_type=c.type,
                         care_giver_id=c.care_giver_id)] + [
                make(wire.RecipientCertificateRevoked, recipient_routing_key(r, "revoked"), recipient_id=r,
                     certificate_id=c.id, patient_id=c.patient_id, reason=reason)
                for r in recipients]
        case events.Sent(certificate=c, recipient_id=r, sent_by=sent_by):
            broadcast = make(wire.CertificateSent, certificate_id=c.id, certificate_type=c.type, recipient_id=r,
                             sent_by=sent_by)
            if c.test_certificate:
                return [broadcast]
            return [broadcast, make(wire.RecipientCertificateSent, recipient_routing_key(r, "sent"),
                                    recipient_id=r, sent_by=sent_by, certificate=whole_certificate(c))]
        case events.Archived(certificate_id=cid):
            return [make(wire.CertificateArchived, certificate_id=cid)]
        case events.Restored(certificate_id=cid):
            return [make(wire.CertificateRestored, certificate_id=cid)]
        case events.CareCopyRemoved(certificate_id=cid, care_giver_id=gid):
            return [make(wire.CareCopyRemoved, certificate_id=cid, care_giver_id=gid)]
        case events.Purged(certificate_id=cid, reason=reason):
            return [make(wire.CertificatePurged, certificate_id=cid, reason=reason)]
    raise TypeError(f"no wire event for {type(fact).__name__}")
