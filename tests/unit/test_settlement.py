"""What a published batch's confirms and returns mean for its outbox rows (`publishers.settlement`), no broker."""
from __future__ import annotations

import pytest

from publishers.settlement import NACKED, UNROUTABLE_REPLY, recipient_of, settle
from storage.outbox import OutboxRow


def row(id: int, routing_key: str, kind: str = "event") -> OutboxRow:
    return OutboxRow(kind=kind, exchange="" if kind == "reply" else "intyg.events", routing_key=routing_key,
                     message_id=f"m-{id}", body=b"{}", id=id)


def test_acked_rows_are_published():
    out = settle([row(1, "certificate.registered"), row(2, "amq.gen-abc", "reply")], [True, True], set())
    assert out.published == [1, 2] and out.failed == {} and out.notes == {}


def test_a_nacked_row_fails_and_the_rest_of_the_batch_is_published_all_the_same():
    out = settle([row(1, "certificate.sent"), row(2, "certificate.registered")], [False, True], set())
    assert out.failed == {1: NACKED} and out.published == [2] and out.nacked == 1


def test_a_returned_reply_is_published_with_a_note_because_nobody_can_ever_receive_it():
    out = settle([row(7, "gone-queue", "reply")], [True], {0})
    assert out.published == [7] and out.notes == {7: UNROUTABLE_REPLY} and out.unroutable_replies == 1


def test_a_returned_broadcast_event_nobody_subscribes_to_is_published():
    out = settle([row(3, "certificate.archived")], [True], {0})
    assert out.published == [3] and out.unsubscribed_events == 1 and out.failed == {}


def test_a_returned_recipient_delivery_fails_and_asks_for_its_queue_once():
    out = settle([row(4, "recipient.FKASSA.certificate.sent"), row(5, "recipient.FKASSA.certificate.revoked"),
                  row(6, "recipient.AF.certificate.sent")], [True, True, True], {0, 1, 2})
    assert out.published == []
    assert out.failed == {4: "recipient queue recipient.FKASSA missing", 5: "recipient queue recipient.FKASSA missing",
                          6: "recipient queue recipient.AF missing"}
    assert out.missing_recipients == ["FKASSA", "AF"]


def test_a_returned_and_nacked_row_counts_as_nacked():
    out = settle([row(8, "recipient.FKASSA.certificate.sent")], [False], {0})
    assert out.failed == {8: NACKED} and out.missing_recipients == []


def test_every_row_needs_its_confirm():
    with pytest.raises(ValueError):
        settle([row(1, "certificate.registered")], [], set())


@pytest.mark.parametrize(("routing_key", "recipient"), [
    ("recipient.FKASSA.certificate.sent", "FKASSA"), ("recipient..certificate.sent", None),
    ("recipient.FKASSA", None), ("certificate.sent", None)])
def test_recipient_of_a_routing_key(routing_key, recipient):
    assert recipient_of(routing_key) == recipient
