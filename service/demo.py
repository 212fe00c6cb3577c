"""`intygstjanst demo`: a care system, a citizen and Försäkringskassan talk to a running service, and each step
prints what they see — the seed's slides played out on the wire."""
from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from collections.abc import Callable
from typing import Any

from rich.console import Console

from contracts.topology import recipient_binding
from publishers.amqp import Broker
from service.client import Client, Listener
from service.testdata import random_personnummer

CARE_GIVER = {"id": "SE2321000016-1000", "name": "Vårdgivare 1"}
CARE_UNIT = {"id": "SE2321000016-1004", "name": "Vårdenhet 1"}
# CONTRACT §9: who in care accesses, named in every care message.
NURSE = {"accessed_by": {"person_id": "SE2321000016-1007", "name": "Sara Sjuksköterska",
                         "care_unit_id": CARE_UNIT["id"]}}


def lisjp(certificate_id: str, patient_id: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone(dt.timedelta(hours=1))).replace(microsecond=0)
    return {
        "id": certificate_id, "type": "lisjp", "type_version": "1.3", "patient_id": patient_id,
        "signed_at": now.isoformat(), "valid_from": now.date().isoformat(),
        "valid_to": (now.date() + dt.timedelta(days=29)).isoformat(),
        "issued_by": {"person_id": "SE2321000016-1003", "name": "Ajla Doktor", "care_unit": CARE_UNIT,
                      "care_giver": CARE_GIVER},
        "test_certificate": False, "relations": [],
        "document": {"media_type": "application/xml", "encoding": "utf-8",
                     "content": "<intyg><diagnos>J06.9</diagnos><sjukskrivning>100 %</sjukskrivning></intyg>"},
    }


def run(amqp_url: str | Broker, console: Console | None = None, seed: int | None = None) -> list[dict[str, Any]]:
    """Plays the story; returns every reply, in order (the tests read them)."""
    console = console or Console()
    rng = random.Random(seed)
    patient, certificate_id = random_personnummer(rng), f"demo-{uuid.uuid4()}"
    replies: list[dict[str, Any]] = []
    # A private queue with FKASSA's binding: the demo sees what FKASSA receives without taking it from FKASSA.
    fkassa = Listener(amqp_url, binding=recipient_binding("FKASSA"))

    with Client(amqp_url) as client:
        def step(actor: str, what: str, routing_key: str, body: dict[str, Any],
                 show: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
            reply = client.call(routing_key, body)
            replies.append(reply)
            shown = show(reply) if show and reply.get("data") is not None else reply.get("data")
            label = reply["result"] + (f" {reply['code']}" if reply.get("code") else "")
            console.print(f"[bold]{actor:>17}[/] {what}: [cyan]{label}[/] — {reply['message']}")
            if shown not in (None, {}):
                console.print(f"{'':>17}   {json.dumps(shown, ensure_ascii=False)}")
            return reply

        def readers(reply: dict[str, Any]) -> list[str]:
            """The citizen's view (Patientdatalagen 8 kap. 6 §): who in care accessed what, and when."""
            return [f"{e['at'][:19]} {e['person_name']} ({e['care_unit_id']}) {e['action']} {e['certificate_id']}"
                    for e in reply["data"]["entries"]]

        def titles(reply: dict[str, Any]) -> list[str]:
            return [f"{c['type']} {c['id']} archived={c['archived']}" for c in reply["data"]["certificates"]]

        console.rule("Intygstjänsten demo")
        step("care system", "registers a lisjp", "certificate.register",
             {"certificate": lisjp(certificate_id, patient)})
        step("citizen", "gives consent", "consent.set", {"patient_id": patient, "given": True})
        step("citizen", "lists certificates", "certificate.list", {"patient_id": patient}, titles)
        step("citizen", "sends it to FKASSA", "certificate.send",
             {"certificate_id": certificate_id, "patient_id": patient, "recipient_id": "FKASSA",
              "sent_by": "CITIZEN"})
        delivery = fkassa.expect("recipient.FKASSA.certificate.sent")
        console.print(f"[bold]{'Försäkringskassan':>17}[/] receives {delivery['certificate']['type']} "
                      f"{delivery['certificate']['id']} sent by {delivery['sent_by']}")
        step("citizen", "archives it", "certificate.set-status",
             {"certificate_id": certificate_id, "patient_id": patient, "status": "ARCHIVED"})
        step("citizen", "lists (in view)", "certificate.list", {"patient_id": patient}, titles)
        step("citizen", "lists the archive", "certificate.list", {"patient_id": patient, "archived": True}, titles)
        step("care system", "reads its copy", "certificate.get-for-care",
             {"certificate_id": certificate_id, "care_giver_id": CARE_GIVER["id"], **NURSE},
             lambda r: {"statuses": [s["status"] for s in r["data"]["statuses"]]})
        step("care system", "removes its copy", "certificate.remove-care-copy",
             {"certificate_id": certificate_id, "care_giver_id": CARE_GIVER["id"], **NURSE})
        step("care system", "reads its copy", "certificate.get-for-care",
             {"certificate_id": certificate_id, "care_giver_id": CARE_GIVER["id"], **NURSE})
        step("citizen", "withdraws consent", "consent.set", {"patient_id": patient, "given": False})
        step("citizen", "reads it", "certificate.get", {"certificate_id": certificate_id, "patient_id": patient})
        step("care system", "registers it again", "certificate.register",
             {"certificate": lisjp(certificate_id, patient)})
        console.rule("the certificate is purged for good")
        step("citizen", "asks who read it", "access-log.list", {"patient_id": patient}, readers)
        console.rule("the access log outlives the certificate")
    fkassa.close()
    return replies
