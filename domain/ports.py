"""What the handlers need from storage, as protocols: the SQL unit of work and the unit tests' fake both
fulfil them, so the rules never learn how they are stored."""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from domain.access import Access
from domain.model import Certificate, Consent


@dataclass(frozen=True)
class PageKey:
    """Keyset position: lists run newest `signed_at` first, ties broken by id."""

    signed_at: dt.datetime
    certificate_id: str


@dataclass(frozen=True)
class CitizenFilter:
    patient_id: str
    archived: bool
    types: frozenset[str]  # empty = every type
    hidden_types: frozenset[str]  # never listed (db, doi)
    signed_from: dt.date | None
    signed_to: dt.date | None  # inclusive


class Certificates(Protocol):
    def get(self, certificate_id: str, *, with_document: bool = False, for_update: bool = False) -> Certificate | None:
        """The certificate with its statuses; `for_update` locks its row until the unit of work ends."""

    def is_purged(self, certificate_id: str) -> bool: ...

    def add(self, certificate: Certificate) -> None:
        """Store a new certificate with its document and statuses."""

    def save(self, certificate: Certificate) -> None:
        """Persist flags and statuses added since it was loaded or added."""

    def purge(self, certificate: Certificate, reason: str, at: dt.datetime) -> None:
        """Delete it, its document and statuses for good; keep only a tombstone with its id."""

    def list_for_citizen(self, query: CitizenFilter, after: PageKey | None, limit: int) -> Sequence[Certificate]:
        """Without documents, newest first."""

    def list_for_care(self, patient_id: str, care_giver_id: str, care_unit_ids: frozenset[str],
                      after: PageKey | None, limit: int) -> Sequence[Certificate]:
        """Only certificates still available to care, without documents, newest first."""

    def without_care_copy(self, patient_id: str, *, for_update: bool = False) -> Sequence[Certificate]: ...

    def care_copies(self, care_giver_id: str, limit: int, *, for_update: bool = True) -> Sequence[Certificate]:
        """Up to `limit` certificates of the care giver that still have a care copy (a care giver leaving)."""


@dataclass(frozen=True)
class AccessKey:
    """Keyset position in one patient's access log: newest first, ties broken by message and certificate id."""

    at: dt.datetime
    message_id: str
    certificate_id: str


@dataclass(frozen=True)
class AccessFilter:
    patient_id: str
    day_from: dt.date | None  # Swedish calendar days, both inclusive
    day_to: dt.date | None


class AccessLog(Protocol):
    def add(self, entries: Sequence[Access], publications: Sequence[object]) -> None:
        """Store the entries not stored before (same message id and certificate id) and queue, for exactly those,
        their publication (`publications[i]` is the outbox message of `entries[i]`) in this unit of work."""

    def list_for_patient(self, query: AccessFilter, after: AccessKey | None, limit: int) -> Sequence[Access]:
        """Newest first."""


class Consents(Protocol):
    def get(self, patient_id: str) -> Consent:
        """The patient's consent; not given when there is no record."""

    def save(self, consent: Consent) -> None: ...


class Progress(Protocol):
    """Running totals of work done in batches across several transactions, keyed by the request."""

    def get(self, message_id: str) -> tuple[int, int]: ...

    def add(self, message_id: str, citizen_only: int, purged: int) -> None: ...


class UnitOfWork(Protocol):
    certificates: Certificates
    consents: Consents
    progress: Progress
    access_log: AccessLog

    def lock_patient(self, patient_id: str) -> None:
        """Serialise every change that touches one patient (consent and purges) until commit or rollback."""

    def commit(self) -> None: ...

    def rollback(self) -> None: ...
