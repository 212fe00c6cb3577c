"""The rules of the seed, one function per command. Each checks first and changes second: a refusal
(`Refused`) leaves everything as it was. Changes are recorded on the aggregate as statuses and events."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from domain import events
from domain.errors import Refused, no_consent, not_found
from domain.model import Catalogue, Certificate, Consent, must_purge


@dataclass(frozen=True)
class Outcome:
    """What an accepted command answers: OK (`info` None) or one of the INFO codes, with optional data."""

    message: str
    info: str | None = None
    data: dict[str, Any] | None = None


@dataclass
class Purge:
    """Certificates to delete for good; only their ids stay behind, as tombstones."""

    certificates: list[Certificate] = field(default_factory=list)


def register(new: Certificate, existing: Certificate | None, purged: bool, catalogue: Catalogue,
             now: dt.datetime) -> Outcome:
    """Slide 2: a registered certificate is a copy of the record, available to care and to the citizen."""
    if new.type not in catalogue.certificate_types:
        raise Refused("UNKNOWN_CERTIFICATE_TYPE", f"certificate type {new.type!r} is not configured")
    if purged:
        raise Refused("PURGED", "a certificate with this id was purged and is never stored again")
    if existing is not None:
        if existing.patient_id == new.patient_id and existing.content_fingerprint() == new.content_fingerprint():
            return Outcome("the certificate is already stored", info="ALREADY_EXISTS")
        raise Refused("CONFLICT", "a different certificate is stored under this id")
    new.available_to_care, new.archived = True, False
    new.record("RECEIVED", now)
    new.events.append(events.Registered(new))
    return Outcome("certificate registered")


def revoke(certificate: Certificate | None, purged: bool, patient_id: str, revoked_by: str,
           reason: str | None, now: dt.datetime) -> Outcome:
    """Care withdraws its certificate; every recipient it was sent to is told (unless it is a test)."""
    if certificate is None:
        refusal = not_found()
        refusal.retry_until_found = not purged
        raise refusal
    if certificate.patient_id != patient_id:
        raise not_found()
    if certificate.revoked:
        return Outcome("the certificate is already revoked", info="ALREADY_REVOKED")
    certificate.revoked_at = now
    certificate.record("REVOKED", now, target=revoked_by)
    recipients = () if certificate.test_certificate else tuple(dict.fromkeys(certificate.sent_to))
    certificate.events.append(events.Revoked(certificate, reason, recipients))
    return Outcome("certificate revoked")


def remove_care_copy(certificate: Certificate | None, care_giver_id: str, consent: Consent, purge: Purge,
                     now: dt.datetime) -> Outcome:
    """Slides 7 and 8: with consent the certificate stays the citizen's; without, it is deleted."""
    if certificate is None or certificate.care_giver_id != care_giver_id:
        raise not_found()
    if not certificate.available_to_care:
        return Outcome("the care copy is already removed", info="NO_CHANGE", data={"outcome": "CITIZEN_ONLY"})
    certificate.available_to_care = False
    if must_purge(certificate, consent):
        certificate.events.append(events.Purged(certificate.id, "CARE_COPY_REMOVED_WITHOUT_CONSENT"))
        purge.certificates.append(certificate)
        return Outcome("care copy removed; without consent the certificate was purged", data={"outcome": "PURGED"})
    certificate.record("CARE_COPY_REMOVED", now, target=care_giver_id)
    certificate.events.append(events.CareCopyRemoved(certificate.id, care_giver_id))
    return Outcome("care copy removed; the certificate stays the citizen's", data={"outcome": "CITIZEN_ONLY"})


def set_status(certificate: Certificate | None, consent: Consent, status: str, now: dt.datetime) -> Outcome:
    """Slide 6: archiving moves it out of the citizen's view; care keeps its copy either way."""
    _citizen_may_reach(certificate, consent)
    assert certificate is not None
    archive = status == "ARCHIVED"
    if certificate.archived == archive:
        return Outcome(f"the certificate is already {'archived' if archive else 'in view'}", info="NO_CHANGE")
    certificate.archived = archive
    certificate.record(status, now)
    certificate.events.append(events.Archived(certificate.id) if archive else events.Restored(certificate.id))
    return Outcome("certificate archived" if archive else "certificate restored")


def send(certificate: Certificate | None, consent: Consent, patient_id: str, recipient_id: str, sent_by: str,
         care_giver_id: str | None, catalogue: Catalogue, now: dt.datetime) -> Outcome:
    """Checked in the contract's order: visible to the sender, not revoked, not already sent there, not a test,
    recipient known and active, recipient takes the type."""
    if sent_by == "CITIZEN":
        _citizen_may_reach(certificate, consent)
    elif certificate is None or certificate.patient_id != patient_id or care_giver_id is None \
            or not certificate.visible_to_care(care_giver_id):
        raise not_found()
    assert certificate is not None
    if certificate.revoked:
        raise Refused("REVOKED", "the certificate is revoked and cannot be sent")
    if recipient_id in certificate.sent_to:
        return Outcome(f"the certificate is already sent to {recipient_id}", info="ALREADY_SENT")
    if certificate.test_certificate:
        raise Refused("TEST_CERTIFICATE", "a test certificate cannot be sent")
    recipient = catalogue.recipients.get(recipient_id)
    if recipient is None or not recipient.active:
        raise Refused("UNKNOWN_RECIPIENT", f"recipient {recipient_id!r} is not configured or not active")
    if certificate.type not in recipient.certificate_types:
        raise Refused("RECIPIENT_REJECTS_TYPE", f"{recipient_id} does not take certificates of type {certificate.type}")
    certificate.record("SENT", now, target=recipient_id)
    certificate.events.append(events.Sent(certificate, recipient_id, sent_by))
    return Outcome(f"certificate sent to {recipient_id}")


def set_consent(consent: Consent, given: bool, without_care_copy: Iterable[Certificate], purge: Purge,
                now: dt.datetime) -> Outcome:
    """Slides 9 and 10: withdrawing consent deletes every certificate whose care copy is already removed;
    the rest stay, because care still has its copy."""
    if consent.given == given:
        return Outcome(f"consent is already {'given' if given else 'withdrawn'}", info="NO_CHANGE",
                       data={"purged": 0})
    consent.given, consent.changed_at = given, now
    purged = 0
    if not given:
        for certificate in without_care_copy:
            if must_purge(certificate, consent):
                certificate.events.append(events.Purged(certificate.id, "CONSENT_WITHDRAWN"))
                purge.certificates.append(certificate)
                purged += 1
    return Outcome("consent given" if given else "consent withdrawn", data={"purged": purged})


def citizen_get(certificate: Certificate | None, consent: Consent) -> Certificate:
    _citizen_may_reach(certificate, consent)
    assert certificate is not None
    return certificate


def care_get(certificate: Certificate | None, care_giver_id: str) -> Certificate:
    if certificate is None or not certificate.visible_to_care(care_giver_id):
        raise not_found()
    return certificate


def require_consent(consent: Consent) -> None:
    """Slide 9: without consent the citizen reaches none of the certificates."""
    if not consent.given:
        raise no_consent()


def _citizen_may_reach(certificate: Certificate | None, consent: Consent) -> None:
    require_consent(consent)
    if certificate is None or not certificate.visible_to_citizen(consent):
        raise not_found()
