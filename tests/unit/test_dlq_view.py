"""What an operator sees of a dead letter without asking for more: the shape of the body and the fields that
identify no one; and how dead letters are grouped and selected by why and when they failed."""
from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

from contracts.topology import H_DEAD_LETTERED_AT, H_ERROR, H_ERROR_CODE, H_ORIGINAL_ROUTING_KEY
from publishers import dlq as ops

try:
    from tests import factories
except ImportError:  # tests/ itself on sys.path
    import factories

PATIENT = "191212121212"


def letter(code: str | None = "UNAVAILABLE", at: str | None = "2026-11-25T18:30:00.000Z", *,
           routing_key: str = "certificate.send", body: bytes = b"{}", **headers) -> ops.DeadLetter:
    if code is not None:
        headers = {H_ERROR_CODE: code, H_ERROR: "database unreachable", H_DEAD_LETTERED_AT: at,
                   H_ORIGINAL_ROUTING_KEY: routing_key, **headers}
    properties = SimpleNamespace(headers=headers, message_id=f"m-{code}-{at}", content_type="application/json",
                                 user_id=None)
    return ops.dead_letter("intyg.status.dlq", properties, body)


def test_a_registrations_body_is_masked_but_for_what_identifies_no_one():
    body = json.dumps({"certificate": factories.certificate_json(id="cert-1", patient_id=PATIENT)}).encode()
    masked = json.loads(ops.mask(body))
    certificate = masked["certificate"]
    assert (certificate["id"], certificate["type"], certificate["patient_id"]) == ("cert-1", "lisjp", ops.MASK)
    assert certificate["document"] == {"media_type": ops.MASK, "encoding": ops.MASK, "content": ops.MASK}
    assert certificate["issued_by"]["name"] == ops.MASK and certificate["issued_by"]["person_id"] == ops.MASK
    assert certificate["issued_by"]["care_giver"]["name"] == ops.MASK
    text = ops.mask(body)
    assert PATIENT not in text and "Ajla Doktor" not in text and "intyg>" not in text


def test_a_personnummer_is_masked_even_in_a_field_that_is_otherwise_shown():
    masked = json.loads(ops.mask(json.dumps({"certificate_id": f"c-{PATIENT}", "given": True}).encode()))
    assert masked == {"certificate_id": ops.MASK, "given": ops.MASK}


def test_a_body_that_is_not_json_is_not_shown_at_all():
    assert ops.mask(f"patient {PATIENT}".encode()) == "(20 bytes, not JSON)"


def test_a_dead_letter_of_the_broker_is_named_by_the_brokers_reason():
    deaths = [{"reason": "delivery_limit", "queue": "intyg.status", "count": 1,
               "time": dt.datetime(2026, 11, 25, 19, 0, 5), "routing-keys": ["certificate.send"]}]
    dead = letter(None, **{"x-death": deaths, "x-first-death-reason": "delivery_limit"})
    assert (dead.code, dead.by_broker) == ("broker:delivery_limit", True)
    assert dead.routing_key == "certificate.send" and dead.dead_lettered_at == "2026-11-25T19:00:05.000Z"
    assert dead.as_json()["dead_lettered_by"] == "broker"


def test_dead_letters_are_grouped_by_queue_and_code_with_counts_and_times():
    letters = [letter("UNAVAILABLE", "2026-11-25T18:30:00.000Z"), letter("UNAVAILABLE", "2026-11-25T23:10:00.000Z",
               routing_key="certificate.revoke"), letter("INVALID_MESSAGE", "2026-11-25T12:00:00.000Z")]
    groups = ops.summarize(letters)
    assert [(g.code, g.count) for g in groups] == [("UNAVAILABLE", 2), ("INVALID_MESSAGE", 1)]
    assert (groups[0].oldest, groups[0].newest) == ("2026-11-25T18:30:00.000Z", "2026-11-25T23:10:00.000Z")
    assert groups[0].types == {"certificate.send": 1, "certificate.revoke": 1}


def test_a_filter_selects_by_code_and_time_window():
    since = dt.datetime(2026, 11, 25, 18, 0, tzinfo=dt.UTC)
    last_night = ops.Filter(frozenset({"UNAVAILABLE"}), since, since + dt.timedelta(hours=12))
    assert last_night.matches(letter("UNAVAILABLE", "2026-11-25T18:30:00.000Z"))
    assert not last_night.matches(letter("UNAVAILABLE", "2026-11-25T17:59:59.999Z"))
    assert not last_night.matches(letter("UNAVAILABLE", "2026-11-26T06:00:00.000Z"))
    assert not last_night.matches(letter("INVALID_MESSAGE", "2026-11-25T18:30:00.000Z"))
    assert not last_night.matches(letter("UNAVAILABLE", None))  # no time: not in any window
    assert not ops.Filter() and ops.Filter().matches(letter("UNAVAILABLE", None))
