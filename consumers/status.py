"""The commands that change a stored certificate: revoke, remove care copy (one, or all of a care giver's),
archive/restore, send. Patient first, then certificate: one lock order everywhere, so no deadlocks."""
from __future__ import annotations

from contracts.commands import RemoveCareCopies, RemoveCareCopy, RevokeCertificate, SendCertificate, SetStatus
from consumers.access_log import record, recorded
from consumers.context import Context, Handled
from consumers.wire import reply_for, wire_events
from contracts.replies import Reply
from domain import lifecycle
from domain.access import REMOVE_CARE_COPY, REVOKE, SEND
from domain.errors import not_found
from domain.lifecycle import Outcome, Purge
from domain.model import Certificate
from domain.ports import UnitOfWork


def revoke(message: RevokeCertificate, uow: UnitOfWork, ctx: Context) -> Handled:
    uow.lock_patient(message.patient_id)
    certificate = uow.certificates.get(message.certificate_id, for_update=True)
    if certificate is not None and not ctx.caller.may_act_for(certificate.care_giver_id):
        raise not_found()
    purged = certificate is None and uow.certificates.is_purged(message.certificate_id)
    with recorded(uow, ctx, REVOKE, certificate, message.accessed_by):
        outcome = lifecycle.revoke(certificate, purged, message.patient_id, message.revoked_by.person_id,
                                   message.reason, ctx.now)
    return _saved(certificate, outcome, uow, ctx)


def remove_care_copy(message: RemoveCareCopy, uow: UnitOfWork, ctx: Context) -> Handled:
    certificate = _locked_with_patient(message.certificate_id, uow)
    if certificate is None:
        raise not_found()
    purge = Purge()
    with recorded(uow, ctx, REMOVE_CARE_COPY, certificate, message.accessed_by):
        outcome = lifecycle.remove_care_copy(certificate, message.care_giver_id,
                                             uow.consents.get(certificate.patient_id), purge, ctx.now)
    return _saved(certificate, outcome, uow, ctx, purge)


def remove_care_copies(message: RemoveCareCopies, uow: UnitOfWork, ctx: Context) -> Handled:
    """A care giver leaves: the same rule for each of its certificates, in bounded batches. Each call handles one
    batch and keeps running totals, so a crash in the middle resumes where it stopped."""
    batch = uow.certificates.care_copies(message.care_giver_id, ctx.bulk_batch_size, for_update=False)
    citizen_only = purged = 0
    facts: list = []
    removed: list[Certificate] = []
    for patient_id in sorted({c.patient_id for c in batch}):
        uow.lock_patient(patient_id)
    for listed in batch:
        certificate = uow.certificates.get(listed.id, for_update=True)
        if certificate is None or not certificate.visible_to_care(message.care_giver_id):
            continue
        purge = Purge()
        lifecycle.remove_care_copy(certificate, message.care_giver_id, uow.consents.get(certificate.patient_id),
                                   purge, ctx.now)
        _persist(certificate, purge, uow, ctx)
        removed.append(certificate)
        facts.extend(certificate.pull_events())
        purged += len(purge.certificates)
        citizen_only += not purge.certificates
    record(uow, ctx, REMOVE_CARE_COPY, removed, message.accessed_by)
    uow.progress.add(ctx.request_id, citizen_only, purged)
    events = wire_events(facts, ctx.now)
    if len(batch) == ctx.bulk_batch_size:
        return Handled(None, events, more=True)
    done_citizen_only, done_purged = uow.progress.get(ctx.request_id)
    data = {"citizen_only": done_citizen_only, "purged": done_purged}
    return Handled(Reply.ok(ctx.request_id, "the care giver's copies are removed", data), events)


def set_status(message: SetStatus, uow: UnitOfWork, ctx: Context) -> Handled:
    uow.lock_patient(message.patient_id)
    certificate = uow.certificates.get(message.certificate_id, for_update=True)
    outcome = lifecycle.set_status(certificate, uow.consents.get(message.patient_id), message.status, ctx.now)
    return _saved(certificate, outcome, uow, ctx)


def send(message: SendCertificate, uow: UnitOfWork, ctx: Context) -> Handled:
    uow.lock_patient(message.patient_id)
    certificate = uow.certificates.get(message.certificate_id, with_document=True, for_update=True)
    by_care = certificate if message.sent_by == "CARE" else None  # a citizen's own send is no access by care
    with recorded(uow, ctx, SEND, by_care, message.accessed_by):
        outcome = lifecycle.send(certificate, uow.consents.get(message.patient_id), message.patient_id,
                                 message.recipient_id, message.sent_by, message.care_giver_id, ctx.catalogue,
                                 ctx.now)
    return _saved(certificate, outcome, uow, ctx)


def _locked_with_patient(certificate_id: str, uow: UnitOfWork) -> Certificate | None:
    """Commands that name only the certificate learn its patient first, lock the patient, then re-read."""
    found = uow.certificates.get(certificate_id)
    if found is None:
        return None
    uow.lock_patient(found.patient_id)
    return uow.certificates.get(certificate_id, for_update=True)


def _saved(certificate: Certificate | None, outcome: Outcome, uow: UnitOfWork, ctx: Context,
           purge: Purge | None = None) -> Handled:
    facts = []
    if certificate is not None and certificate.events:
        _persist(certificate, purge or Purge(), uow, ctx)
        facts = certificate.pull_events()
    return Handled(reply_for(outcome, ctx.request_id), wire_events(facts, ctx.now))


def _persist(certificate: Certificate, purge: Purge, uow: UnitOfWork, ctx: Context) -> None:
    if purge.certificates:
        uow.certificates.purge(certificate, "CARE_COPY_REMOVED_WITHOUT_CONSENT", ctx.now)
    else:
        uow.certificates.save(certificate)
