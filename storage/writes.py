"""Write buffering for the unit of work: INSERTs of new rows wait and go out together.

The message loop runs a batch of messages in one transaction. Registering a certificate inserts five rows
(certificate, document, status, inbox, outbox); sent one by one that is five round trips per message, and each
multi-row `insert().values([...])` is a new statement SQLAlchemy compiles again. Buffered, every table's rows of
a batch go in one binary COPY (many rows: the least CPU per row) or one executemany that rides a psycopg pipeline
with the queued statements (a few rows: the fewest round trips), and only the final flush waits for the pipeline
(one round trip); see `_insert`.

Rules, like an ORM's flush:
- `defer(table, rows)` queues rows; once `send_after_rows` are queued they are sent (`send`).
- `defer_statement(sql, params)` queues a statement whose result nobody reads (the access log's insert of the new
  entries with their outbox rows); sent after the queued inserts of the same `send`, in the order queued.
- Before any statement that goes to the database through this connection (`execute`, `scalar`, `scalars`),
  the queue is flushed first, so every read sees the transaction's own writes (read-your-writes) and every
  UPDATE/DELETE finds the rows it is about.
- The unit of work also flushes before a savepoint begins, when a savepoint ends without error (so a failing
  write fails inside the savepoint of the message that made it), and before `commit()`.
- Tables are flushed parents first (`metadata.sorted_tables`, so foreign keys hold); within one table rows keep
  the order they were queued in, so the outbox's ids follow the order the messages were handled in (CONTRACT §7:
  events of one certificate in the order they happened). Other tables are sorted by primary key, so two
  transactions inserting the same keys lock them in the same order.
- After a rollback (of the transaction or to a savepoint) the queue is `discard`ed: those writes never happened.
- `flush` sends what is queued, waits for every result (any error of any send raises here at the latest) and
  runs the after-flush checks.
- A flush that fails sets `flush_failed`: the error belongs to whichever message queued the rows, not
  necessarily to the one whose statement triggered the flush (the message loop then finds the culprit with a
  savepoint per message).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from typing import Any, NamedTuple

import psycopg
from sqlalchemy import (BigInteger, Boolean, Connection, Date, DateTime, Insert, Integer, LargeBinary, String,
                        Table)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy import exc as sa_exc

from storage.tables import metadata

_RANK = {table: rank for rank, table in enumerate(metadata.sorted_tables)}
_INSERTS: dict[Table, Insert] = {}


def insert_statement(table: Table) -> Insert:
    """One `table.insert()` per table, so the compiled form is cached (the parameters come with the execute).
    `inline()`: no implicit RETURNING of a generated key for a single row (nobody needs the outbox id at insert
    time, and inside a pipeline the result is not there to read until the pipeline syncs)."""
    statement = _INSERTS.get(table)
    if statement is None:
        statement = _INSERTS[table] = table.insert().inline()
    return statement


# The binary COPY type of each column type the schema uses (subclasses before their bases); a table with a column of
# any other type has its rows sent by INSERT only. Character types travel as `text`: in binary COPY the server reads
# them with the column's own input rules (length, padding) all the same.
_COPY_TYPES: tuple[tuple[type, str], ...] = (
    (JSONB, "jsonb"), (BigInteger, "int8"), (Integer, "int4"), (Boolean, "bool"), (Date, "date"),
    (LargeBinary, "bytea"), (String, "text"),
)


class _Statements(NamedTuple):
    """How rows with these columns go in: `insert` (psycopg's SQL, one row) for an executemany, `copy` and its
    `types` for a binary COPY (None: a column type COPY is not set up for here), and the dialect's bind processor
    of each position that has one (with psycopg only JSON(B) has: it wraps the value in `Jsonb`, so the
    connection's JSON dumper serialises it as SQLAlchemy would)."""

    insert: str
    copy: str | None
    types: tuple[str, ...]
    wrap: dict[int, Any]


@lru_cache(maxsize=None)
def _statements(table: Table, names: tuple[str, ...], dialect: Any) -> _Statements:
    quote = dialect.identifier_preparer
    columns = [table.c[name] for name in names]
    listed = f"{quote.format_table(table)} ({', '.join(quote.format_column(c) for c in columns)})"
    types: list[str] = []
    for column in columns:
        if isinstance(column.type, DateTime):
            types.append("timestamptz" if column.type.timezone else "timestamp")
        elif (kind := next((name for base, name in _COPY_TYPES if isinstance(column.type, base)), None)) is not None:
            types.append(kind)
    wrap = {}
    for i, column in enumerate(columns):
        process = column.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            wrap[i] = process
    return _Statements(insert=f"INSERT INTO {listed} VALUES ({', '.join(['%s'] * len(columns))})",
                       copy=f"COPY {listed} FROM STDIN (FORMAT BINARY)" if len(types) == len(columns) else None,
                       types=tuple(types), wrap=wrap)


@lru_cache(maxsize=None)
def _primary_key(table: Table) -> Callable[[Mapping[str, Any]], tuple] | None:
    names = [c.name for c in table.primary_key.columns]
    if not names or any(c.autoincrement is True for c in table.primary_key.columns):
        return None  # a sequence decides (the outbox): keep the queued order
    return lambda row: tuple(row[name] for name in names)


class BufferedConnection:
    """A SQLAlchemy `Connection` whose inserts of new rows may wait (see the module docstring). Everything not
    defined here is the wrapped connection's (`commit`, `rollback`, `begin_nested`, ...)."""

    # Queued rows beyond which they are sent at once, so that a big transaction does not hold them all: a default
    # batch of 100 registrations (500 rows) goes in one send. Measured with 20 KB registrations: a COPY of 100 rows
    # per table costs the client ~48 us a registration, of 50 rows ~55, of 25 rows ~80 (each COPY is a statement
    # and a round trip of its own).
    send_after_rows = 1024
    # Rows of one table from which they go in by COPY rather than by executemany (see `_insert`): about where the
    # two cost the client the same.
    copy_from_rows = 25

    def __init__(self, connection: Connection) -> None:
        self._conn = connection
        self._rows: dict[Table, list[dict[str, Any]]] = {}
        self._statements: list[tuple[str, Mapping[str, Any]]] = []
        self._queued = 0
        self._after_flush: dict[Table, Callable[[list[dict[str, Any]]], None]] = {}
        self._unchecked: list[tuple[Callable[[list[dict[str, Any]]], None], list[dict[str, Any]]]] = []
        self._pipeline: Any = None  # an open psycopg pipeline (its context manager) while what rides it is in flight
        self.flush_failed = False

    @property
    def raw(self) -> Connection:
        return self._conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    # -- the queue -----------------------------------------------------------------------------------------------

    def defer(self, table: Table, rows: Iterable[dict[str, Any]]) -> None:
        """Queue rows for `table` (every row of one table with the same keys)."""
        queue = self._rows.setdefault(table, [])
        before = len(queue)
        queue.extend(rows)
        self._queued += len(queue) - before
        if self._queued >= self.send_after_rows:
            self.send()

    def defer_statement(self, sql: str, params: Mapping[str, Any]) -> None:
        """Queue one statement in psycopg's own SQL (`%(name)s` parameters) that returns nothing to read."""
        self._statements.append((sql, params))
        self._queued += 1
        if self._queued >= self.send_after_rows:
            self.send()

    def after_flush(self, table: Table, check: Callable[[list[dict[str, Any]]], None]) -> None:
        """`check(rows)` runs once `table`'s queued rows are inserted (before `flush` returns); it may raise."""
        self._after_flush[table] = check

    @property
    def pending(self) -> bool:
        return bool(self._rows) or bool(self._statements) or self._pipeline is not None or bool(self._unchecked)

    def send(self) -> None:
        """Insert the queued rows (a COPY or an executemany per table), then send the queued statements in the
        psycopg pipeline and return without waiting for what rides it. A failure may surface here (an earlier
        send's) or at the next `flush`."""
        if not self._rows and not self._statements:
            return
        queued, self._rows, self._queued = self._rows, {}, 0
        statements, self._statements = self._statements, []
        with self._failing():
            for table in sorted(queued, key=lambda t: _RANK.get(t, len(_RANK))):
                rows = queued[table]
                key = _primary_key(table)
                if key is not None and len(rows) > 1:
                    rows = sorted(rows, key=key)
                self._insert(table, rows)
                check = self._after_flush.get(table)
                if check is not None:
                    self._unchecked.append((check, rows))
            if statements:
                self._pipelined()
            for sql, params in statements:
                self._execute_raw(sql, params)

    def flush(self) -> None:
        """Insert everything queued and wait until it is in: every error of every send so far raises here at the
        latest. Then run the after-flush checks."""
        if not self.pending:
            return
        self.send()
        with self._failing():
            self._end_pipeline()
            checks, self._unchecked = self._unchecked, []
            merged: dict[Callable[[list[dict[str, Any]]], None], list[dict[str, Any]]] = {}
            for check, rows in checks:  # one check for the rows of every send
                merged.setdefault(check, []).extend(rows)
            for check, rows in merged.items():
                check(rows)

    def discard(self) -> None:
        """Forget what is queued and in flight (the transaction or savepoint is being rolled back)."""
        self._rows, self._statements, self._queued, self._unchecked = {}, [], 0, []
        self._end_pipeline(errors_matter=False)  # its errors belong to writes being rolled back

    # -- machinery -----------------------------------------------------------------------------------------------

    @contextmanager
    def _failing(self) -> Iterator[None]:
        """Mark `flush_failed` on any error; wrap psycopg's own (raised by the pipeline, not by a statement
        SQLAlchemy ran) the way SQLAlchemy would, so callers see one kind of error whichever way it came."""
        try:
            yield
        except BaseException as error:
            self.flush_failed = True
            self._end_pipeline(errors_matter=False)  # the transaction is lost anyway; the first error matters
            if not isinstance(error, psycopg.Error):
                raise
            broken = self._lost(error)
            if broken and not self._conn.invalidated:
                self._conn.invalidate()  # not back into the pool: the next checkout would get a dead connection
            raise sa_exc.DBAPIError.instance(
                "(flushing queued inserts)", None, error, psycopg.Error, hide_parameters=True,
                connection_invalidated=broken, dialect=self._conn.dialect) from error

    def _lost(self, error: psycopg.Error) -> bool:
        """The connection is gone (or going: the server's FATAL may come before the end of the stream)."""
        driver = self._driver()
        if driver is None or driver.broken or driver.closed:
            return True
        state = error.sqlstate
        return (state is None and isinstance(error, psycopg.OperationalError)) or (
            state is not None and (state.startswith("08") or state in ("57P01", "57P02", "57P03")))

    def _driver(self) -> Any:
        try:
            return self._conn.connection.driver_connection
        except Exception:  # noqa: BLE001 - closed or invalidated: no pipeline
            return None

    def _insert(self, table: Table, rows: list[dict[str, Any]]) -> None:
        """Straight on the psycopg connection, past SQLAlchemy's per-row parameter processing: `copy_from_rows` rows
        and more in one binary COPY, fewer in an executemany that rides the pipeline. psycopg sends each row of an
        executemany as a statement of its own (a poll and a send each) and dumps its parameters in Python, while a
        COPY row is formatted in C and streamed: measured with 20 KB registrations, a COPY of 100 rows a table cost
        the client ~48 us a registration against ~73-128 for the executemany, but a COPY is two round trips of its
        own and cannot run inside the pipeline, so a few rows (a batch of one or two messages, at a low rate) go
        faster and sooner by executemany. Errors come out wrapped like SQLAlchemy's (`_failing`)."""
        driver = self._driver()
        if driver is None or any(len(row) != len(rows[0]) for row in rows):  # let SQLAlchemy sort it out
            self._conn.execute(insert_statement(table), rows)
            return
        if not self._conn.in_transaction():
            self._conn.begin()  # SQLAlchemy must know of the transaction psycopg is about to begin, to commit it
        names = tuple(rows[0])
        statements = _statements(table, names, self._conn.dialect)
        wrap = statements.wrap
        values = [[row[name] for name in names] for row in rows] if not wrap else [
            [wrap[i](row[name]) if i in wrap else row[name] for i, name in enumerate(names)] for row in rows]
        if statements.copy is None or len(rows) < self.copy_from_rows:
            self._pipelined()
            with driver.cursor() as cursor:
                cursor.executemany(statements.insert, values)
            return
        self._end_pipeline()  # COPY cannot run in a pipeline: what rides it is synced first
        with driver.cursor() as cursor, cursor.copy(statements.copy) as out:
            out.set_types(statements.types)
            for row in values:
                out.write_row(row)

    def _execute_raw(self, sql: str, params: Mapping[str, Any]) -> None:
        driver = self._driver()
        if driver is None:
            self._conn.exec_driver_sql(sql, dict(params))
            return
        if not self._conn.in_transaction():
            self._conn.begin()
        with driver.cursor() as cursor:
            cursor.execute(sql, params)

    def _pipelined(self) -> None:
        """Enter psycopg pipeline mode unless in it: executemanys and queued statements ride one pipeline, which is
        synced (one round trip) only when `flush` needs the results, or before a COPY. Without pipeline support each
        waits for its own results."""
        if self._pipeline is not None:
            return
        driver = self._driver()
        if driver is None or not hasattr(driver, "pipeline") or not psycopg.Pipeline.is_supported():
            pipeline: Any = nullcontext()
        else:
            pipeline = driver.pipeline()
        pipeline.__enter__()
        self._pipeline = pipeline

    def _end_pipeline(self, *, errors_matter: bool = True) -> None:
        """Leave pipeline mode, waiting for everything that rode it; its errors raise unless they do not matter."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is None:
            return
        try:
            pipeline.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 - any error of what rode it
            if errors_matter:
                raise

    # -- statements: flush first -----------------------------------------------------------------------------------

    def execute(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Any:
        if self.pending:
            self.flush()
        return self._conn.execute(statement, parameters, **kwargs)

    def scalar(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Any:
        if self.pending:
            self.flush()
        return self._conn.scalar(statement, parameters, **kwargs)

    def scalars(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Any:
        if self.pending:
            self.flush()
        return self._conn.scalars(statement, parameters, **kwargs)


def insert_rows(connection: Any, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Queue `rows` on a `BufferedConnection`, or insert them at once (one executemany) on a plain connection."""
    if not rows:
        return
    if isinstance(connection, BufferedConnection):
        connection.defer(table, rows)
    else:
        connection.execute(insert_statement(table), list(rows))


__all__ = ["BufferedConnection", "insert_rows", "insert_statement"]
