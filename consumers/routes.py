"""Which handler answers which routing key, and which role may send it (CONTRACT.md §5, §6, §8)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from contracts import commands, queries
from consumers import consent, queries as q, registration, status

CARE, CITIZEN, OPERATOR = "care", "citizen-portal", "operator"


@dataclass(frozen=True)
class Route:
    model: type[BaseModel]
    handler: Callable
    roles: frozenset[str]
    query: bool = False


def _route(model, handler, *roles: str, query: bool = False) -> tuple[str, Route]:
    return model.MESSAGE_TYPE, Route(model, handler, frozenset({*roles, OPERATOR}), query)


ROUTES: dict[str, Route] = dict([
    _route(commands.RegisterCertificate, registration.register, CARE),
    _route(commands.RevokeCertificate, status.revoke, CARE),
    _route(commands.RemoveCareCopy, status.remove_care_copy, CARE),
    _route(commands.RemoveCareCopies, status.remove_care_copies, CARE),
    _route(commands.SetStatus, status.set_status, CITIZEN),
    _route(commands.SendCertificate, status.send, CARE, CITIZEN),
    _route(commands.SetConsent, consent.set_consent, CITIZEN),
    _route(queries.GetCertificate, q.get_certificate, CITIZEN, query=True),
    _route(queries.ListCertificates, q.list_certificates, CITIZEN, query=True),
    _route(queries.GetCertificateForCare, q.get_certificate_for_care, CARE, query=True),
    _route(queries.ListCertificatesForCare, q.list_certificates_for_care, CARE, query=True),
    _route(queries.GetConsent, q.get_consent, CITIZEN, CARE, query=True),
    _route(queries.ListRecipients, q.list_recipients, CITIZEN, CARE, query=True),
    _route(queries.ListAccessLog, q.list_access_log, CITIZEN, query=True),  # §9: care never reads the log
])


def role_needed(message: BaseModel, route: Route) -> frozenset[str]:
    """A send speaks for whoever `sent_by` names: care sends as care, the portal as the citizen."""
    if isinstance(message, commands.SendCertificate):
        return frozenset({CARE if message.sent_by == "CARE" else CITIZEN, OPERATOR})
    return route.roles


def care_giver_named(message: BaseModel) -> str | None:
    """The care giver a care message acts for, when the message itself names one."""
    if isinstance(message, commands.RegisterCertificate):
        return message.certificate.issued_by.care_giver.id
    return getattr(message, "care_giver_id", None)
