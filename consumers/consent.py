"""`consent.set`: the citizen's consent decides what is deleted for good (slides 9 and 10)."""
from __future__ import annotations

from contracts.commands import SetConsent
from consumers.context import Context, Handled
from consumers.wire import reply_for, wire_events
from domain import lifecycle
from domain.lifecycle import Purge
from domain.ports import UnitOfWork


def set_consent(message: SetConsent, uow: UnitOfWork, ctx: Context) -> Handled:
    uow.lock_patient(message.patient_id)
    consent = uow.consents.get(message.patient_id)
    without_care_copy = [] if message.given else uow.certificates.without_care_copy(message.patient_id,
                                                                                      for_update=True)
    purge = Purge()
    outcome = lifecycle.set_consent(consent, message.given, without_care_copy, purge, ctx.now)
    if outcome.info is None:
        uow.consents.save(consent)
    facts = []
    for certificate in purge.certificates:
        uow.certificates.purge(certificate, "CONSENT_WITHDRAWN", ctx.now)
        facts.extend(certificate.pull_events())
    return Handled(reply_for(outcome, ctx.request_id), wire_events(facts, ctx.now))
