"""Which database errors are worth retrying.

The message loop retries a message with back-off when `is_transient` says so, and answers UNAVAILABLE and
dead-letters it once the retries are used up; anything else is a bug or a bad message and goes to the DLQ at
once. A retry always re-runs the whole unit of work from a fresh transaction: after a deadlock or a lost
connection the transaction (not just the savepoint) must be given up, because the locks it still holds are what
the other side is waiting for.

Transient:
- lost or refused connection: SQLSTATE class 08, 57P01/57P02/57P03 (server shut down or starting), psycopg or
  SQLAlchemy OperationalError without a SQLSTATE, an invalidated connection, the pool timing out;
- 40001 serialization_failure and 40P01 deadlock_detected: PostgreSQL asks us to retry;
- 55P03 lock_not_available: our `lock_timeout` fired, someone held the row or patient lock too long;
- 25006 read_only_sql_transaction: the connection is on a standby (a failover happened under it, or a URL
  without `target_session_attrs=read-write`); a new connection finds the primary;
- 57014 query_canceled: our `statement_timeout` fired (or an operator cancelled the query);
- class 53 insufficient resources (too many connections, out of memory, disk full): may pass;
- 23505 unique_violation of a key we check before inserting (`RACED_KEYS`): two deliveries raced — two
  registers of one id, or a message redelivered while its first delivery was still running. The retry reads the
  winner's row and answers ALREADY_EXISTS / CONFLICT / the stored reply, which is the right answer;
- `RacedWithPurge`: a register inserted an id that another transaction registered and purged meanwhile (see
  `SqlCertificates._not_purged_since`); the retry finds the tombstone and answers PURGED.
Not transient: any other integrity error (it is a bug: retrying cannot change the data), 54xxx program limits
(an index row too large stays too large), syntax and data errors.

Refused values (`is_refused_value`): class 22 data exceptions (a character PostgreSQL cannot store, a number
or date out of range, a string too long) and class 54 program limits come from what the message carried: the
message is INVALID_MESSAGE and is not retried.
"""
from __future__ import annotations

import psycopg
from sqlalchemy import exc as sa_exc

TRANSIENT_STATES = frozenset({"25006", "40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03"})
TRANSIENT_CLASSES = ("08", "53")
REFUSED_VALUE_CLASSES = ("22", "54")
UNIQUE_VIOLATION = "23505"
# Primary keys whose violation means "another transaction inserted the same thing first".
RACED_KEYS = frozenset({"certificates_pkey", "certificate_documents_pkey", "certificate_statuses_pkey",
                        "inbox_pkey"})


class RacedWithPurge(Exception):
    """Raised inside the transaction that would bring a purged certificate back; transient (retry)."""


def is_transient(exc: BaseException) -> bool:
    """True if the same message may well succeed when tried again in a new transaction."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _verdict(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


def _verdict(exc: BaseException) -> bool | None:
    """True/False when `exc` decides it, None to look at its cause."""
    if isinstance(exc, RacedWithPurge):
        return True
    if isinstance(exc, (sa_exc.TimeoutError, sa_exc.DisconnectionError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if exc.orig is not None:
            return _verdict(exc.orig)
        return isinstance(exc, sa_exc.OperationalError)
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:
            # No server answer at all: the connection broke (OperationalError) or was closed under us.
            return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
        if state in TRANSIENT_STATES or state.startswith(TRANSIENT_CLASSES):
            return True
        if state == UNIQUE_VIOLATION:
            return exc.diag.constraint_name in RACED_KEYS
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return None


def is_refused_value(exc: BaseException) -> bool:
    """True if the database refused a value the message carried (it will refuse it every time)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DBAPIError) and current.orig is not None:
            current = current.orig
            continue
        if isinstance(current, psycopg.Error):
            return bool(current.sqlstate) and current.sqlstate.startswith(REFUSED_VALUE_CLASSES)
        current = current.__cause__ or current.__context__
    return False
