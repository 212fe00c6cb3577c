"""Drives the handlers the way the message loop does, without a broker: an `Envelope` is parsed, processed in a
`FakeUnitOfWork` transaction, committed (again and again while a handler has `more` to do), and answered."""
from __future__ import annotations

import datetime as dt
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from consumers.pipeline import Envelope, Invalid, Policy, error_reply, parse, process
from contracts.replies import Reply
from contracts.topology import ACCESS_LOGGED
from domain.model import Catalogue, Recipient
from service.settings import DEFAULT_RECIPIENTS, DEFAULT_TYPES

try:
    from tests import factories
    from tests.fakes import FakeUnitOfWork
except ImportError:  # tests/ itself on sys.path
    import factories
    from fakes import FakeUnitOfWork

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)
REPLY_TO = "amq.rabbitmq.reply-to"

CATALOGUE = Catalogue(
    certificate_types=frozenset(DEFAULT_TYPES),
    recipients={r.id: Recipient(r.id, r.name, frozenset(r.certificate_types), r.trusted, r.active)
                for r in DEFAULT_RECIPIENTS},
)


def policy(**overrides: Any) -> Policy:
    return Policy(**{"catalogue": CATALOGUE, **overrides})


_ids = itertools.count(1)
_BY = {"accessed_by": factories.ACCESSED_BY}  # CONTRACT §9: care messages name who accesses


@dataclass
class Service:
    """One service instance over one in-memory database."""

    policy: Policy = field(default_factory=policy)
    uow: FakeUnitOfWork = field(default_factory=FakeUnitOfWork)
    now: dt.datetime = NOW
    calls: int = 0  # handler calls of the last message (more than one for work done in batches)
    _seen: int = 0  # outbox messages already returned by `new_events`
    # What the loop publishes once the transaction is committed: (reply_to, correlation_id, reply)
    replies: list[tuple[str, str | None, Reply]] = field(default_factory=list)

    def envelope(self, routing_key: str, body: Any, *, message_id: str | None = None, reply_to: str | None = REPLY_TO,
                 **properties: Any) -> Envelope:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        if message_id is None:
            message_id = f"m-{next(_ids)}"
        return Envelope(routing_key=routing_key, body=raw, message_id=message_id or None, reply_to=reply_to,
                        **properties)

    def deliver(self, envelope: Envelope) -> Reply | None:
        """What the loop does with one delivery; an invalid one is answered and changes nothing."""
        self.now += dt.timedelta(seconds=1)
        self.calls = 0
        try:
            parsed = parse(envelope, self.policy)
            with self.uow:
                while True:
                    self.calls += 1
                    processed = process(parsed, self.uow, self.policy, self.now)
                    self.uow.commit()
                    if not processed.more:
                        break
        except Invalid as invalid:
            reply = error_reply(envelope, invalid.code, invalid.message)
        else:
            reply = processed.reply
        if reply is not None and envelope.reply_to:
            self.replies.append((envelope.reply_to, envelope.reply_correlation_id, reply))
        return reply

    def send(self, routing_key: str, body: Any, **kwargs: Any) -> Reply | None:
        return self.deliver(self.envelope(routing_key, body, **kwargs))

    # --- events ------------------------------------------------------------------------------------------------
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """The certificate events and recipient deliveries (access log entries: `access_events`)."""
        return [(m.routing_key, json.loads(m.body)) for m in self.uow.state.outbox
                if m.kind == "event" and m.routing_key != ACCESS_LOGGED]

    def new_events(self) -> list[tuple[str, dict[str, Any]]]:
        out = self.uow.state.outbox
        fresh = [(m.routing_key, json.loads(m.body)) for m in out[self._seen:]
                 if m.kind == "event" and m.routing_key != ACCESS_LOGGED]
        self._seen = len(out)
        return fresh

    def access_events(self) -> list[dict[str, Any]]:
        """What went to `intyg.access-log` through the outbox, oldest first."""
        return [json.loads(m.body) for m in self.uow.state.outbox if m.routing_key == ACCESS_LOGGED]

    # --- the commands and queries in their usual shape ------------------------------------------------------
    def register(self, **overrides: Any) -> Reply:
        return self.send("certificate.register", {"certificate": factories.certificate_json(**overrides)})

    def consent(self, patient_id: str, given: bool = True) -> Reply:
        return self.send("consent.set", {"patient_id": patient_id, "given": given})

    def set_status(self, certificate_id: str, patient_id: str, status: str) -> Reply:
        return self.send("certificate.set-status",
                         {"certificate_id": certificate_id, "patient_id": patient_id, "status": status})

    def remove_care_copy(self, certificate_id: str, care_giver_id: str = factories.CARE_GIVER) -> Reply:
        return self.send("certificate.remove-care-copy",
                         {"certificate_id": certificate_id, "care_giver_id": care_giver_id, **_BY})

    def remove_care_copies(self, care_giver_id: str = factories.CARE_GIVER, **kwargs: Any) -> Reply:
        return self.send("care-giver.remove-care-copies", {"care_giver_id": care_giver_id, **_BY}, **kwargs)

    def revoke(self, certificate_id: str, patient_id: str = factories.PATIENT, reason: str | None = "fel patient") -> Reply:
        return self.send("certificate.revoke", {"certificate_id": certificate_id, "patient_id": patient_id,
                                                "revoked_by": {"person_id": "SE2321000016-1003", "name": "Ajla"},
                                                "reason": reason, **_BY})

    def send_to(self, certificate_id: str, recipient_id: str = "FKASSA", patient_id: str = factories.PATIENT,
                sent_by: str = "CITIZEN", care_giver_id: str | None = None) -> Reply:
        return self.send("certificate.send", {"certificate_id": certificate_id, "patient_id": patient_id,
                                              "recipient_id": recipient_id, "sent_by": sent_by,
                                              "care_giver_id": care_giver_id, **(_BY if sent_by == "CARE" else {})})

    def get(self, certificate_id: str, patient_id: str = factories.PATIENT) -> Reply:
        return self.send("certificate.get", {"certificate_id": certificate_id, "patient_id": patient_id})

    def list(self, patient_id: str = factories.PATIENT, **filters: Any) -> Reply:
        return self.send("certificate.list", {"patient_id": patient_id, **filters})

    def get_for_care(self, certificate_id: str, care_giver_id: str = factories.CARE_GIVER) -> Reply:
        return self.send("certificate.get-for-care", {"certificate_id": certificate_id, "care_giver_id": care_giver_id,
                                                      **_BY})

    def list_for_care(self, patient_id: str = factories.PATIENT, care_giver_id: str = factories.CARE_GIVER,
                      care_unit_ids: tuple[str, ...] = (factories.CARE_UNIT,), **more: Any) -> Reply:
        return self.send("certificate.list-for-care", {"patient_id": patient_id, "care_giver_id": care_giver_id,
                                                       "care_unit_ids": list(care_unit_ids), **_BY, **more})

    def access_log(self, patient_id: str = factories.PATIENT, user_id: str | None = None, **fields: Any) -> Reply:
        return self.send("access-log.list", {"patient_id": patient_id, **fields}, user_id=user_id)

    def logged(self) -> list[tuple[str, str, str]]:
        """(action, certificate id, person id) of every stored access log entry, oldest first."""
        entries = sorted(self.uow.state.access_log.values(), key=lambda e: (e.at, e.message_id, e.certificate_id))
        return [(e.action, e.certificate_id, e.person_id) for e in entries]

    # --- short answers --------------------------------------------------------------------------------------
    def citizen_ids(self, patient_id: str = factories.PATIENT, **filters: Any) -> list[str] | str:
        """Ids the citizen lists, or the error code when refused."""
        reply = self.list(patient_id, **filters)
        if reply.result.value == "ERROR":
            return reply.code.value
        return [c["id"] for c in reply.data["certificates"]]

    def care_ids(self, patient_id: str = factories.PATIENT, care_giver_id: str = factories.CARE_GIVER,
                 care_unit_ids: tuple[str, ...] = (factories.CARE_UNIT,)) -> list[str]:
        reply = self.list_for_care(patient_id, care_giver_id, care_unit_ids)
        assert reply.result.value == "OK", reply
        return [c["id"] for c in reply.data["certificates"]]


def code(reply: Reply | None) -> str | None:
    """OK, or the INFO/ERROR code."""
    assert reply is not None
    return reply.code.value if reply.code else reply.result.value
