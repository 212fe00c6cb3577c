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
    # No patient lock (unlike the other commands): a new certificate is available to care, so neither the purge
    # rule (it purges only certificates without a care copy) nor a concurrent consent withdrawal can involve it,
    # and two registers of one id at once are decided by the primary key: the loser's insert fails (transient),
    # and its retry reads the winner's row (ALREADY_EXISTS or CONFLICT). An id registered and purged meanwhile by
    # others is caught right after our insert (`SqlCertificates._not_purged_since`), and the retry answers PURGED.
    existing = uow.certificates.get(new.id, for_update=True, with_document=True)  # to compare, if it exists
    purged = existing is None and uow.certificates.is_purged(new.id)
    outcome = lifecycle.register(new, existing, purged, ctx.catalogue, ctx.now)
    facts = new.pull_events()
    if facts:
        uow.certificates.add(new)
    return Handled(reply_for(outcome, ctx.request_id), wire_events(facts, ctx.now))
