"""What a handler knows besides the message: when, who asks, and the configured catalogue."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from contracts.events import Event
from contracts.replies import Reply
from domain.model import Catalogue


@dataclass(frozen=True)
class Caller:
    role: str | None = None  # None when roles are not enforced
    care_giver_ids: frozenset[str] | None = None  # None: any care giver

    def may_act_for(self, care_giver_id: str) -> bool:
        return self.care_giver_ids is None or care_giver_id in self.care_giver_ids


@dataclass(frozen=True)
class Context:
    request_id: str
    now: dt.datetime
    catalogue: Catalogue
    caller: Caller = Caller()
    bulk_batch_size: int = 500


@dataclass
class Handled:
    """A handler's answer. `more` asks the loop to commit and call again (work done in bounded batches)."""

    reply: Reply | None
    events: list[Event] = field(default_factory=list)
    more: bool = False
