"""What a published batch's confirms and returns mean for its outbox rows: pure, no broker, no database.

A batch holds at most one row per ordering key (`storage.outbox`), so each row is settled on its own:
- acked: published.
- returned, then acked (unroutable with `mandatory`; RabbitMQ sends the return before the ack):
  - a reply: its requester's queue is gone and nobody can ever receive it; published, noted `unroutable reply`.
  - a broadcast event nobody subscribes to: published (nobody asked for it).
  - a recipient delivery (`recipient.R.*`): `recipient.R` is missing. Nothing for a recipient may be dropped:
    the row failed, and the queue is declared again before the next try.
- nacked: failed; tried again after a back-off, parked after the last attempt.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from contracts.topology import recipient_queue
from storage.outbox import OutboxRow

UNROUTABLE_REPLY = "unroutable reply"
NACKED = "nacked by the broker"
RECIPIENT_PREFIX = "recipient."


def recipient_of(routing_key: str) -> str | None:
    """`recipient.FKASSA.certificate.sent` -> `FKASSA`."""
    if not routing_key.startswith(RECIPIENT_PREFIX):
        return None
    parts = routing_key.split(".")
    return parts[1] if len(parts) > 2 and parts[1] else None


@dataclass
class Settlement:
    published: list[int] = field(default_factory=list)  # row ids to mark published (or erase)
    notes: dict[int, str] = field(default_factory=dict)  # a published row's note
    failed: dict[int, str] = field(default_factory=dict)  # row id -> why: to be tried again
    missing_recipients: list[str] = field(default_factory=list)  # recipient queues to declare again
    unroutable_replies: int = 0
    unsubscribed_events: int = 0
    nacked: int = 0


def settle(rows: Sequence[OutboxRow], acked: Sequence[bool], returned: Collection[int]) -> Settlement:
    """`acked[i]`: the broker's confirm of `rows[i]` (True ack, False nack); `returned`: indexes of returned rows."""
    out = Settlement()
    for index, (row, ack) in enumerate(zip(rows, acked, strict=True)):
        if not ack:
            out.failed[row.id] = NACKED
            out.nacked += 1
        elif index not in returned:
            out.published.append(row.id)
        elif row.kind == "reply":
            out.published.append(row.id)
            out.notes[row.id] = UNROUTABLE_REPLY
            out.unroutable_replies += 1
        elif (recipient := recipient_of(row.routing_key)) is not None:
            out.failed[row.id] = f"recipient queue {recipient_queue(recipient)} missing"
            if recipient not in out.missing_recipients:
                out.missing_recipients.append(recipient)
        else:
            out.published.append(row.id)
            out.unsubscribed_events += 1
    return out
