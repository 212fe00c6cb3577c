"""`certificate.register`: care stores a copy of its record (slide 2)."""
from __future__ import annotations

from contracts.commands import RegisterCertificate
from consumers.context import Context, Handled
from consumers.wire import certificate_from_wire, reply_for, wire_events
from domain import lifecycle
from domain.errors import Refused
from domain.ports import UnitOfWork


def register(message: RegisterCertificate, uow: UnitOfWork, ctx: Context) -> Handled:
    new = certificate_from_wire(message.certificate)
    if not ctx.caller.may_act_for(new.care_giver_id):
        raise Refused("FORBIDDEN", "this user may not register certificates for that care giver")
    uow.lock_patient(new.patient_id)
    existing = uow.certificates.get(new.id, for_update=True)
    purged = existing is None and uow.certificates.is_purged(new.id)
    outcome = lifecycle.register(new, existing, purged, ctx.catalogue, ctx.now)
    if new.events:
        uow.certificates.add(new)
    return Handled(reply_for(outcome, ctx.request_id), wire_events(new.events, ctx.now))
