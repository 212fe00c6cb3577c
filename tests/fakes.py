"""An in-memory unit of work for the unit tests: `domain.ports.UnitOfWork` plus the inbox and outbox the
pipeline writes, with real transaction semantics (what is not committed is rolled back).

Reads hand out copies, like the SQL one hands out fresh objects: a handler that changes a certificate without
`save` changes nothing.
"""
from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from zoneinfo import ZoneInfo

from domain.access import Access
from domain.model import Certificate, Consent
from domain.ports import AccessFilter, AccessKey, CitizenFilter, PageKey

CALENDAR_ZONE = ZoneInfo("Europe/Stockholm")  # list dates are Swedish calendar days, as in storage.certificates


@dataclass
class State:
    certificates: dict[str, Certificate] = field(default_factory=dict)
    documents: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    tombstones: dict[str, str] = field(default_factory=dict)  # id -> reason
    consents: dict[str, Consent] = field(default_factory=dict)
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)
    inbox: dict[str, dict[str, Any]] = field(default_factory=dict)
    outbox: list[Any] = field(default_factory=list)  # storage.outbox.OutboxMessage, in order
    access_log: dict[tuple[str, str], Access] = field(default_factory=dict)  # (message id, certificate id) ->

    def snapshot(self) -> State:
        """Stored values are never changed in place (reads copy, writes replace), so copying the containers is
        enough to go back to this moment."""
        return State(**{name: copy.copy(value) for name, value in vars(self).items()})


def _copy(certificate: Certificate, with_document: bool, documents: dict) -> Certificate:
    document = copy.deepcopy(documents.get(certificate.id)) if with_document else None
    return replace(certificate, content=copy.deepcopy(certificate.content), statuses=list(certificate.statuses),
                   document=document, events=[])


def _newest_first(rows: list[Certificate], after: PageKey | None, limit: int) -> list[Certificate]:
    if after is not None:
        rows = [c for c in rows if (c.signed_at, c.id) < (after.signed_at, after.certificate_id)]
    return sorted(rows, key=lambda c: (c.signed_at, c.id), reverse=True)[:limit]


class FakeCertificates:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    @property
    def _s(self) -> State:
        return self._uow.state

    def _out(self, rows: list[Certificate], with_document: bool = False) -> list[Certificate]:
        return [_copy(c, with_document, self._s.documents) for c in rows]

    def get(self, certificate_id: str, *, with_document: bool = False, for_update: bool = False) -> Certificate | None:
        found = self._s.certificates.get(certificate_id)
        return None if found is None else _copy(found, with_document, self._s.documents)

    def is_purged(self, certificate_id: str) -> bool:
        return certificate_id in self._s.tombstones

    def add(self, certificate: Certificate) -> None:
        assert certificate.id not in self._s.certificates, "add of an existing id"
        self._s.certificates[certificate.id] = _copy(certificate, False, {})
        self._s.documents[certificate.id] = copy.deepcopy(certificate.document)

    def save(self, certificate: Certificate) -> None:
        assert certificate.id in self._s.certificates, "save of a certificate that is not stored"
        self._s.certificates[certificate.id] = replace(
            _copy(certificate, False, {}), content=self._s.certificates[certificate.id].content)

    def purge(self, certificate: Certificate, reason: str, at: dt.datetime) -> None:
        self._s.certificates.pop(certificate.id, None)
        self._s.documents.pop(certificate.id, None)
        self._s.tombstones.setdefault(certificate.id, reason)

    def list_for_citizen(self, query: CitizenFilter, after: PageKey | None, limit: int) -> Sequence[Certificate]:
        def day(c: Certificate) -> dt.date:
            return c.signed_at.astimezone(CALENDAR_ZONE).date()

        rows = [c for c in self._s.certificates.values()
                if c.patient_id == query.patient_id and c.archived == query.archived
                and (not query.types or c.type in query.types) and c.type not in query.hidden_types
                and (query.signed_from is None or day(c) >= query.signed_from)
                and (query.signed_to is None or day(c) <= query.signed_to)]
        return self._out(_newest_first(rows, after, limit))

    def list_for_care(self, patient_id: str, care_giver_id: str, care_unit_ids: frozenset[str],
                      after: PageKey | None, limit: int) -> Sequence[Certificate]:
        rows = [c for c in self._s.certificates.values()
                if c.patient_id == patient_id and c.care_giver_id == care_giver_id and c.available_to_care
                and c.care_unit_id in care_unit_ids]
        return self._out(_newest_first(rows, after, limit))

    def without_care_copy(self, patient_id: str, *, for_update: bool = False) -> Sequence[Certificate]:
        rows = [c for c in self._s.certificates.values() if c.patient_id == patient_id and not c.available_to_care]
        return self._out(sorted(rows, key=lambda c: c.id))

    def care_copies(self, care_giver_id: str, limit: int, *, for_update: bool = True) -> Sequence[Certificate]:
        rows = [c for c in self._s.certificates.values() if c.care_giver_id == care_giver_id and c.available_to_care]
        return self._out(sorted(rows, key=lambda c: c.id)[:limit])


class FakeConsents:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def get(self, patient_id: str) -> Consent:
        found = self._uow.state.consents.get(patient_id)
        return copy.copy(found) if found else Consent(patient_id, False, None)

    def save(self, consent: Consent) -> None:
        self._uow.state.consents[consent.patient_id] = copy.copy(consent)


class FakeProgress:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def get(self, message_id: str) -> tuple[int, int]:
        return self._uow.state.progress.get(message_id, (0, 0))

    def add(self, message_id: str, citizen_only: int, purged: int) -> None:
        done = self.get(message_id)
        self._uow.state.progress[message_id] = (done[0] + citizen_only, done[1] + purged)


class FakeAccessLog:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def add(self, entries: Sequence[Access], publications: Sequence[Any]) -> None:
        log = self._uow.state.access_log
        for entry, publication in zip(entries, publications, strict=True):
            if (entry.message_id, entry.certificate_id) not in log:
                log[entry.message_id, entry.certificate_id] = entry
                self._uow.state.outbox.append(publication)

    def list_for_patient(self, query: AccessFilter, after: AccessKey | None, limit: int) -> Sequence[Access]:
        def key(e: Access) -> tuple:
            return (e.at, e.message_id, e.certificate_id)

        def day(e: Access) -> dt.date:
            return e.at.astimezone(CALENDAR_ZONE).date()

        rows = [e for e in self._uow.state.access_log.values()
                if e.patient_id == query.patient_id
                and (query.day_from is None or day(e) >= query.day_from)
                and (query.day_to is None or day(e) <= query.day_to)
                and (after is None or key(e) < (after.at, after.message_id, after.certificate_id))]
        return sorted(rows, key=key, reverse=True)[:limit]


class FakeInbox:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def get(self, message_id: str) -> dict[str, Any] | None:
        found = self._uow.state.inbox.get(message_id)
        return copy.deepcopy(found)

    def add(self, message_id: str, message_type: str, reply: dict[str, Any] | None) -> None:
        assert message_id not in self._uow.state.inbox, "inbox primary key violated"
        self._uow.state.inbox[message_id] = {"message_type": message_type, "reply": copy.deepcopy(reply)}


class FakeOutbox:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def add(self, messages: Sequence[Any]) -> None:
        self._uow.state.outbox.extend(messages)


class FakeUnitOfWork:
    """`with uow:` starts a transaction; leaving it without `commit()` rolls back to where it started."""

    def __init__(self) -> None:
        self.state = State()
        self._committed = self.state.snapshot()
        self.locked: list[str] = []  # every lock_patient call, in order
        self.commits = 0
        self.certificates = FakeCertificates(self)
        self.consents = FakeConsents(self)
        self.progress = FakeProgress(self)
        self.access_log = FakeAccessLog(self)
        self.inbox = FakeInbox(self)
        self.outbox = FakeOutbox(self)

    def __enter__(self) -> FakeUnitOfWork:
        self._committed = self.state.snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rollback()

    def lock_patient(self, patient_id: str) -> None:
        self.locked.append(patient_id)

    def commit(self) -> None:
        self._committed = self.state.snapshot()
        self.commits += 1

    def rollback(self) -> None:
        self.state = self._committed.snapshot()

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        saved = self.state.snapshot()
        try:
            yield
        except BaseException:
            self.state = saved
            raise

    # --- for assertions ------------------------------------------------------------------------------------
    @property
    def outbox_messages(self) -> list[Any]:
        return list(self.state.outbox)
