"""`domain.ports.Consents` on PostgreSQL. No row means consent was never given (CONTRACT §5)."""
from __future__ import annotations

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.dialects.postgresql import insert

from domain.model import Consent
from storage.tables import consents


# Built once (a query runs this on every citizen request; building the select costs more than running it).
_GET = select(consents.c.given, consents.c.changed_at).where(consents.c.patient_id == bindparam("patient_id"))


class SqlConsents:
    def __init__(self, connection: Connection) -> None:
        self._conn = connection

    def get(self, patient_id: str) -> Consent:
        row = self._conn.execute(_GET, {"patient_id": patient_id}).first()
        if row is None:
            return Consent(patient_id, False, None)
        return Consent(patient_id, row.given, row.changed_at)

    def save(self, consent: Consent) -> None:
        # Changes to one patient's consent are serialised by `lock_patient`; the upsert only spares a read.
        statement = insert(consents).values(patient_id=consent.patient_id, given=consent.given,
                                            changed_at=consent.changed_at)
        self._conn.execute(statement.on_conflict_do_update(
            index_elements=[consents.c.patient_id],
            set_={"given": statement.excluded.given, "changed_at": statement.excluded.changed_at}))
