"""Which model a routing key carries, and the JSON Schema of every message type."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from contracts import commands, events, queries
from contracts.certificate import StoredCertificate
from contracts.replies import Reply

COMMANDS: dict[str, type[BaseModel]] = {
    m.MESSAGE_TYPE: m
    for m in (commands.RegisterCertificate, commands.RevokeCertificate, commands.RemoveCareCopy,
              commands.RemoveCareCopies, commands.SetStatus, commands.SendCertificate, commands.SetConsent)
}
QUERIES: dict[str, type[BaseModel]] = {
    m.MESSAGE_TYPE: m
    for m in (queries.GetCertificate, queries.ListCertificates, queries.GetCertificateForCare,
              queries.ListCertificatesForCare, queries.GetConsent, queries.ListRecipients,
              queries.ListAccessLog)
}
MESSAGES: dict[str, type[BaseModel]] = {**COMMANDS, **QUERIES}
EVENTS: dict[str, type[events.Event]] = {
    m.ROUTING_KEY: m
    for m in (events.CertificateRegistered, events.CertificateRevoked, events.CertificateSent,
              events.CertificateArchived, events.CertificateRestored, events.CareCopyRemoved,
              events.CertificatePurged, events.RecipientCertificateSent, events.RecipientCertificateRevoked,
              events.AccessLogged)
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema per message type, event type, the reply and the stored certificate."""
    schemas: dict[str, dict[str, Any]] = {}
    for key, model in {**MESSAGES, **EVENTS}.items():
        schemas[key.replace("{recipient_id}", "R")] = model.model_json_schema()
    schemas["reply"] = Reply.model_json_schema()
    schemas["stored-certificate"] = StoredCertificate.model_json_schema()
    return schemas
