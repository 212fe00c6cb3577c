"""The outbox relay: publishes what the message loop wrote to the outbox (CONTRACT §7, §8).

How it works
- Leadership. Among several service instances only one relay publishes: the one holding the outbox advisory
  lock (`storage.outbox.try_lead`) on a database session of its own. Every query of the relay runs on that same
  session, so a query that succeeds proves the lock is still held; if the session dies, the query fails, the
  relay drops the broker connection and starts over. A relay that is not the leader asks again every
  `lead_poll_s` seconds.
- Order. Rows are published in id order. A batch is settled in that order too: rows before the first failure
  are marked published, the failed row gets `mark_failed`, and everything from it on is sent again next round
  (later rows of the batch may therefore go out twice; consumers dedupe by `message_id`). So one certificate's
  events never overtake each other.
- Confirm window. One pika `SelectConnection` per leadership term, owned by the thread that calls `run()` (pika is
  not thread-safe). A batch of up to `batch_size` rows is published back to back with `mandatory=True` on a
  channel in confirm mode; Basic.Ack/Nack (with `multiple`) and Basic.Return are matched to the rows, and the
  rows are marked published only once every message of the batch has been confirmed. One round trip per batch
  instead of one per message.
- Returns (unroutable with `mandatory`; RabbitMQ sends the return before the ack of that message):
  a reply whose requester's queue is gone is marked published with `last_error = 'unroutable reply'` (nobody can
  receive it and it must not hold up the outbox); a broadcast event nobody subscribed to is simply published; a
  `recipient.R.*` delivery means the recipient's queue is missing: `recipient.R` is declared again (durable, bound
  to `intyg.events` with `recipient.R.#`) and the delivery is sent again, because nothing for a recipient may be
  dropped.
- Wake-ups. `wake()` may be called from any thread (the message loop calls it after each commit); it schedules a
  round on the relay's I/O loop at once, so replies go out within milliseconds. Without wake-ups the relay polls
  every `poll_s`.
- Faults. Broker or database loss ends the leadership term (the lock is released with the session); the relay
  reconnects with capped exponential back-off. Nothing is marked published unless confirmed, so nothing is lost;
  unconfirmed rows are sent again.
- Housekeeping. Every `housekeeping_s` published rows older than `retention_s` are deleted.
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pika
import structlog
from pika import spec
from sqlalchemy import Connection, Engine

from contracts.topology import EVENTS_EXCHANGE, recipient_binding, recipient_queue
from storage import outbox as store
from storage.access_log import prune_access_log
from storage.outbox import OutboxRow

UNROUTABLE_REPLY = "unroutable reply"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
RECIPIENT_PREFIX = "recipient."
HOUSEKEEPING_CHUNK = 10_000  # outbox rows deleted per statement
HOUSEKEEPING_CHUNKS = 20  # statements per housekeeping round

# What became of one published message, until its batch is settled.
_ACK = "ack"
_NACK = "nack"
_UNROUTABLE_REPLY = "unroutable-reply"
_UNSUBSCRIBED_EVENT = "unsubscribed-event"
_MISSING_RECIPIENT = "missing-recipient"
_SETTLED_OK = {_ACK, _UNROUTABLE_REPLY, _UNSUBSCRIBED_EVENT}


@dataclass
class RelayStats:
    """Counters for health checks and logs (written by the relay thread only)."""

    leader: bool = False
    connected: bool = False  # leading, connected to the broker and publishing
    published: int = 0  # rows marked published
    batches: int = 0
    unroutable_replies: int = 0
    unsubscribed_events: int = 0
    recipient_queues_declared: int = 0
    nacked: int = 0
    interruptions: int = 0  # leadership terms ended by a broker or database fault
    last_error: str | None = None


def recipient_of(routing_key: str) -> str | None:
    """`recipient.FKASSA.certificate.sent` -> `FKASSA`."""
    if not routing_key.startswith(RECIPIENT_PREFIX):
        return None
    parts = routing_key.split(".")
    return parts[1] if len(parts) > 2 and parts[1] else None


def _mandatory(row: OutboxRow) -> bool:
    """RabbitMQ always returns a mandatory message sent to a direct reply-to name, even one it delivers (it is
    "not a queue"), so for those a return would tell nothing: they go without the flag."""
    return not row.routing_key.startswith(DIRECT_REPLY_TO)


def properties_of(row: OutboxRow) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=row.content_type,
        delivery_mode=2,  # persistent
        message_id=row.message_id,
        correlation_id=row.correlation_id,
        type=row.routing_key if row.kind == "event" else None,
        headers=dict(row.headers) if row.headers else None,
    )


class OutboxRelay:
    """Publishes the outbox. `run()` blocks (give it a thread of its own); `wake()` and `stop()` are thread-safe.

    `engine` should have room for one connection held for as long as the relay leads. `recipient_queue_arguments`
    must be the arguments the service's topology declares `recipient.R` with (None: a plain durable queue),
    or re-declaring a missing recipient queue would differ from the topology's declaration.
    """

    def __init__(self, amqp_url: str, engine: Engine, *, batch_size: int = 500, poll_s: float = 0.2,
                 log: Any = None, lead_poll_s: float = 3.0, confirm_timeout_s: float = 30.0,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0,
                 retention_s: float = 86_400.0, housekeeping_s: float = 300.0,
                 access_log_retention_s: float | None = None,
                 recipient_queue_arguments: Mapping[str, Any] | None = None,
                 connection_name: str = "intygstjanst-relay") -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.amqp_url = amqp_url
        self.engine = engine
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.lead_poll_s = lead_poll_s
        self.confirm_timeout_s = confirm_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.retention_s = retention_s
        self.access_log_retention_s = access_log_retention_s  # CONTRACT §9; None: not this relay's job
        self.housekeeping_s = housekeeping_s
        self.recipient_queue_arguments = dict(recipient_queue_arguments) if recipient_queue_arguments else None
        self.connection_name = connection_name
        self.log = (log or structlog.get_logger()).bind(component="outbox-relay")
        self.stats = RelayStats()

        self._lock = threading.Lock()  # guards _session, _wake_pending and the stop fields
        self._session: _Session | None = None
        self._wake_pending = False
        self._stop_requested = False
        self._flush = True
        self._deadline = float("inf")
        self._stopped = threading.Event()  # interrupts the sleeps of run()
        self._done = threading.Event()
        self._done.set()
        self._next_housekeeping = time.monotonic() + min(30.0, housekeeping_s)

    # --- thread-safe controls ----------------------------------------------------------------------------------
    def wake(self) -> None:
        """Publish now rather than at the next poll (e.g. right after a commit that wrote to the outbox)."""
        with self._lock:
            if self._wake_pending or self._session is None:
                return
            self._wake_pending = True
            self._session.call_threadsafe(self._session.on_wake)

    def stop(self, flush: bool = True, timeout: float = 10.0) -> bool:
        """Ask `run()` to end. With `flush`, it first publishes what is pending (if this relay leads), for at most
        `timeout` seconds. Waits for `run()` to return and says whether it did in time."""
        with self._lock:
            self._stop_requested = True
            self._flush = flush
            self._deadline = min(self._deadline, time.monotonic() + timeout)
            if self._session is not None:
                self._session.call_threadsafe(self._session.on_stop)
        self._stopped.set()
        return self._done.wait(timeout + 5.0)

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    # --- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Lead (or wait to lead) and publish until `stop()`."""
        self._done.clear()
        backoff = self.backoff_initial_s
        self.log.info("relay started", batch_size=self.batch_size)
        try:
            while not self._should_end():
                started = time.monotonic()
                try:
                    published = self._lead_once(until_empty=False, deadline=None)
                except Exception as exc:  # broker or database fault: start over after a pause
                    self.stats.interruptions += 1
                    self.stats.last_error = _describe(exc)
                    if self._stop_request()[0]:
                        # Stopping with the broker or database away: what is left stays in the outbox, which
                        # is durable, and the next relay to lead publishes it. Retrying now would only spin.
                        self.log.warning("relay stopping before the outbox is flushed", error=self.stats.last_error)
                        break
                    if time.monotonic() - started > 60.0:
                        backoff = self.backoff_initial_s  # it had been working for a while
                    self.log.warning("relay interrupted, will reconnect", error=self.stats.last_error,
                                     retry_in_s=round(backoff, 2))
                    self._sleep(backoff)
                    backoff = min(backoff * 2, self.backoff_max_s)
                    continue
                if self._stop_request()[0]:
                    break  # flushed (or another instance leads and will publish what is left)
                if published is None:  # another instance leads
                    self._sleep(self.lead_poll_s)
                    continue
                backoff = self.backoff_initial_s
        finally:
            self.log.info("relay stopped", published=self.stats.published)
            self._done.set()

    def run_once(self, timeout: float = 30.0) -> int | None:
        """Publish until the outbox is empty (or `timeout` passes), in the calling thread, then disconnect.
        Returns the number of rows marked published, or None if another relay leads. For tests and tools;
        not while `run()` is running on the same object."""
        return self._lead_once(until_empty=True, deadline=time.monotonic() + timeout)

    def pending(self) -> int:
        with self.engine.connect() as conn:
            return store.pending_count(conn)

    def _should_end(self) -> bool:
        with self._lock:
            if not self._stop_requested:
                return False
            return not self._flush or time.monotonic() >= self._deadline

    def _sleep(self, seconds: float) -> None:
        with self._lock:
            if self._stop_requested:
                seconds = min(seconds, max(0.0, self._deadline - time.monotonic()))
        self._stopped.wait(seconds)

    def _lead_once(self, *, until_empty: bool, deadline: float | None) -> int | None:
        db = self.engine.connect()
        led = False
        try:
            led = store.try_lead(db)
            db.commit()  # the lock is the session's: it outlives the transaction
            if not led:
                return None
            self.stats.leader = True
            self.log.info("relay leads")
            return _Session(self, db, until_empty=until_empty, deadline=deadline).run()
        finally:
            self.stats.leader = False
            if led:
                try:
                    db.invalidate()  # close the session itself, so that the lock goes with it
                except Exception:  # pragma: no cover - a broken connection is closed anyway
                    pass
            try:
                db.close()
            except Exception:  # pragma: no cover
                pass

    # --- used by the session ------------------------------------------------------------------------------------
    def _attach(self, session: _Session) -> None:
        with self._lock:
            self._session = session
            self._wake_pending = False
            if self._stop_requested:
                session.stopping, session.flush = True, self._flush
                session.deadline = min(session.deadline, self._deadline)

    def _detach(self, session: _Session) -> None:
        with self._lock:
            if self._session is session:
                self._session = None

    def _woken(self) -> None:
        with self._lock:
            self._wake_pending = False

    def _stop_request(self) -> tuple[bool, bool, float]:
        with self._lock:
            return self._stop_requested, self._flush, self._deadline

    def _housekeeping_due(self) -> bool:
        if time.monotonic() < self._next_housekeeping:
            return False
        self._next_housekeeping = time.monotonic() + self.housekeeping_s
        return True


class _Session:
    """One leadership term: one AMQP connection and its I/O loop, driven by callbacks on the relay's thread."""

    def __init__(self, relay: OutboxRelay, db: Connection, *, until_empty: bool, deadline: float | None) -> None:
        self.relay = relay
        self.db = db
        self.log = relay.log
        self.until_empty = until_empty
        self.deadline = deadline if deadline is not None else float("inf")
        self.stopping = False
        self.flush = True
        self.closing = False
        self.error: BaseException | None = None
        self.conn: pika.SelectConnection | None = None
        self.channel: Any = None
        self.published = 0
        # the batch in flight
        self.busy = False
        self.again = False
        self.batch: list[OutboxRow] = []
        self.outcome: list[str | None] = []
        self.outstanding: dict[int, int] = {}  # delivery tag -> index in batch, ascending tags
        self.by_message_id: dict[str, deque[int]] = {}
        self.next_tag = 0
        self.blocked = False
        self.timers: dict[str, object] = {}

    # --- lifecycle --------------------------------------------------------------------------------------------
    def run(self) -> int:
        params = pika.URLParameters(self.relay.amqp_url)
        params.client_properties = {"connection_name": self.relay.connection_name}
        self.conn = pika.SelectConnection(params, on_open_callback=self._guard(self._on_open),
                                          on_open_error_callback=self._on_open_error,
                                          on_close_callback=self._on_closed)
        self.relay._attach(self)
        try:
            if self.deadline != float("inf"):
                self._timer("deadline", max(0.0, self.deadline - time.monotonic()), self._on_deadline)
            self.conn.ioloop.start()
        finally:
            self.relay.stats.connected = False
            self.relay._detach(self)
            try:
                self.conn.ioloop.close()
            except Exception:  # pragma: no cover
                pass
        if self.error is not None:
            raise self.error if isinstance(self.error, BaseException) else RuntimeError(str(self.error))
        return self.published

    def call_threadsafe(self, callback: Callable[[], None]) -> None:
        """Called with the relay's lock held, so the loop is not closed under us."""
        assert self.conn is not None
        self.conn.ioloop.add_callback_threadsafe(self._guard(callback))

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        def guarded(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:
                self._fail(exc)
        return guarded

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._close()

    def _close(self) -> None:
        self.closing = True
        for name in list(self.timers):
            self._cancel(name)
        conn = self.conn
        if conn is None:
            return
        if conn.is_closed:
            conn.ioloop.stop()
        elif not conn.is_closing:
            try:
                conn.close()
            except Exception:  # already closing
                conn.ioloop.stop()

    def _on_open_error(self, conn: Any, error: BaseException) -> None:
        if not self.closing and self.error is None:
            self.error = error
        conn.ioloop.stop()

    def _on_closed(self, conn: Any, reason: BaseException) -> None:
        if not self.closing and self.error is None:
            self.error = reason
        conn.ioloop.stop()

    def _on_open(self, conn: Any) -> None:
        conn.add_on_connection_blocked_callback(self._guard(self._on_blocked))
        conn.add_on_connection_unblocked_callback(self._guard(self._on_unblocked))
        conn.channel(on_open_callback=self._guard(self._on_channel_open))

    def _on_channel_open(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._guard(self._on_return))
        channel.confirm_delivery(self._guard(self._on_confirm), callback=self._guard(self._on_confirm_mode))

    def _on_confirm_mode(self, _frame: Any) -> None:
        # The relay publishes to the events exchange: make sure it is there (idempotent, as the topology declares it).
        self.channel.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", durable=True,
                                      callback=self._guard(self._on_ready))

    def _on_ready(self, _frame: Any) -> None:
        self.relay.stats.connected = True
        self.log.info("relay connected")
        self._pump()

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if not self.closing:
            self._fail(reason)

    def _on_blocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = True
        self._cancel("confirm")
        self.log.warning("broker blocks publishing (resource alarm)")

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = False
        if self.busy:
            self._timer("confirm", self.relay.confirm_timeout_s, self._on_confirm_timeout)
        self.log.info("broker unblocked publishing")

    def on_wake(self) -> None:
        self.relay._woken()
        if self.closing:
            return
        if self.busy:
            self.again = True
        elif self.channel is not None:
            self._pump()

    def on_stop(self) -> None:
        requested, flush, deadline = self.relay._stop_request()
        if not requested or self.closing:
            return
        self.stopping, self.flush = True, flush
        if not flush:
            self._close()  # unconfirmed rows stay unpublished and are sent again later
            return
        if deadline < self.deadline:
            self.deadline = deadline
            self._timer("deadline", max(0.0, deadline - time.monotonic()), self._on_deadline)
        if not self.busy and self.channel is not None:
            self._pump()

    def _on_deadline(self) -> None:
        if self.busy:
            self.log.warning("relay stops with messages unconfirmed; they will be sent again",
                             unconfirmed=len(self.outstanding))
        self._close()

    def _on_confirm_timeout(self) -> None:
        raise TimeoutError(f"no publisher confirm within {self.relay.confirm_timeout_s}s")

    # --- timers -------------------------------------------------------------------------------------------------
    def _timer(self, name: str, delay: float, fn: Callable[[], None]) -> None:
        self._cancel(name)
        assert self.conn is not None

        def fire() -> None:
            self.timers.pop(name, None)
            fn()
        self.timers[name] = self.conn.ioloop.call_later(delay, self._guard(fire))

    def _cancel(self, name: str) -> None:
        handle = self.timers.pop(name, None)
        if handle is not None and self.conn is not None:
            self.conn.ioloop.remove_timeout(handle)

    # --- publishing ---------------------------------------------------------------------------------------------
    def _pump(self) -> None:
        """One round: fetch the oldest unpublished rows and publish them; `_settle` runs once all are confirmed."""
        if self.closing:
            return
        if self.busy:
            self.again = True
            return
        self._cancel("poll")
        if (self.stopping and not self.flush) or time.monotonic() >= self.deadline:
            self._close()
            return
        if self.relay._housekeeping_due():
            self._housekeeping()
        rows = store.unpublished(self.db, self.relay.batch_size)
        self.db.commit()
        if not rows:
            if self.stopping or self.until_empty:
                self._close()
            else:
                self._timer("poll", self.relay.poll_s, self._pump)
            return
        self.busy, self.again = True, False
        self.batch, self.outcome = rows, [None] * len(rows)
        self.outstanding, self.by_message_id = {}, {}
        publish = self.channel.basic_publish
        for index, row in enumerate(rows):
            publish(row.exchange, row.routing_key, row.body, properties_of(row), mandatory=_mandatory(row))
            self.next_tag += 1
            self.outstanding[self.next_tag] = index
            self.by_message_id.setdefault(row.message_id, deque()).append(index)
        if not self.blocked:
            self._timer("confirm", self.relay.confirm_timeout_s, self._on_confirm_timeout)

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        # The return of a message comes before its ack: it is the first unconfirmed one with this message_id.
        index = next((i for i in self.by_message_id.get(properties.message_id, ())
                      if self.outcome[i] is None), None)
        if index is None:
            self.log.warning("return of an unknown message", routing_key=method.routing_key)
            return
        row = self.batch[index]
        if row.kind == "reply":
            self.outcome[index] = _UNROUTABLE_REPLY
        elif recipient_of(row.routing_key) is not None:
            self.outcome[index] = _MISSING_RECIPIENT
        else:
            self.outcome[index] = _UNSUBSCRIBED_EVENT

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, spec.Basic.Ack)
        if method.multiple:
            tags = []
            for tag in self.outstanding:
                if tag > method.delivery_tag:
                    break
                tags.append(tag)
        else:
            tags = [method.delivery_tag]
        for tag in tags:
            index = self.outstanding.pop(tag, None)
            if index is None:
                continue
            if not acked:
                self.outcome[index] = _NACK
            elif self.outcome[index] is None:
                self.outcome[index] = _ACK
        if self.busy and not self.outstanding:
            self._settle()

    def _settle(self) -> None:
        """Mark the batch in id order: published up to the first failure, the failure counted, the rest resent."""
        self._cancel("confirm")
        batch, outcome = self.batch, self.outcome
        published: list[int] = []
        unroutable: list[int] = []
        failed: tuple[OutboxRow, str] | None = None
        missing: set[str] = set()
        for row, result in zip(batch, outcome):
            if result == _MISSING_RECIPIENT:
                missing.add(recipient_of(row.routing_key) or "")
            if failed is not None:
                continue
            if result in _SETTLED_OK:
                published.append(row.id)
                if result == _UNROUTABLE_REPLY:
                    unroutable.append(row.id)
                elif result == _UNSUBSCRIBED_EVENT:
                    self.relay.stats.unsubscribed_events += 1
            elif result == _MISSING_RECIPIENT:
                failed = (row, f"recipient queue {recipient_queue(recipient_of(row.routing_key) or '')} missing")
            else:
                failed = (row, "nacked by the broker")
                self.relay.stats.nacked += 1
        for row_id in unroutable:
            store.mark_failed(self.db, row_id, UNROUTABLE_REPLY)
        store.mark_published(self.db, published)
        if failed is not None:
            store.mark_failed(self.db, failed[0].id, failed[1])
        self.db.commit()

        stats = self.relay.stats
        stats.batches += 1
        stats.published += len(published)
        stats.unroutable_replies += len(unroutable)
        self.published += len(published)
        if unroutable:
            self.log.info("replies nobody can receive", count=len(unroutable))
        full = len(batch) == self.relay.batch_size
        self.busy, self.batch, self.outcome = False, [], []
        self.by_message_id = {}

        if failed is not None:
            self.log.warning("outbox row not published, resending from it", row_id=failed[0].id,
                             routing_key=failed[0].routing_key, error=failed[1], attempts=failed[0].attempts + 1)
        if missing:
            self._declare_recipients(sorted(missing - {""}))
        elif failed is not None:
            delay = min(0.05 * 2 ** min(failed[0].attempts, 7), 5.0)
            self._timer("poll", delay, self._pump)
        elif full or self.again or self.stopping or self.until_empty:
            self._timer("poll", 0, self._pump)
        else:
            self._timer("poll", self.relay.poll_s, self._pump)

    def _declare_recipients(self, recipients: list[str]) -> None:
        """Declare each missing `recipient.R` again and bind it, then publish again (from the first failure)."""
        if not recipients:
            self._timer("poll", 0, self._pump)
            return
        recipient, rest = recipients[0], recipients[1:]
        queue = recipient_queue(recipient)

        def bound(_frame: Any) -> None:
            self.relay.stats.recipient_queues_declared += 1
            self.log.warning("recipient queue was missing: declared it again", queue=queue)
            self._declare_recipients(rest)

        def declared(_frame: Any) -> None:
            self.channel.queue_bind(queue, EVENTS_EXCHANGE, routing_key=recipient_binding(recipient),
                                    callback=self._guard(bound))

        self.channel.queue_declare(queue, durable=True, arguments=self.relay.recipient_queue_arguments,
                                   callback=self._guard(declared))

    def _housekeeping(self) -> None:
        now = dt.datetime.now(dt.UTC)
        if self._prune("outbox", store.delete_published_before, now - dt.timedelta(seconds=self.relay.retention_s)) \
                and self.relay.access_log_retention_s is not None:
            self._prune("access log", prune_access_log,
                        now - dt.timedelta(seconds=self.relay.access_log_retention_s))

    def _prune(self, what: str, delete: Callable[[Connection, dt.datetime, int], int], cutoff: dt.datetime) -> bool:
        deleted = 0
        try:
            for _ in range(HOUSEKEEPING_CHUNKS):  # bounded, so publishing never waits long behind it
                chunk = delete(self.db, cutoff, HOUSEKEEPING_CHUNK)
                self.db.commit()
                deleted += chunk
                if chunk < HOUSEKEEPING_CHUNK:
                    break
        except Exception as exc:
            self.db.rollback()  # a broken connection raises here and ends the term
            self.log.warning(f"{what} housekeeping failed", error=_describe(exc))
            return False
        if deleted:
            self.log.info(f"{what} housekeeping", deleted=deleted)
        return True


def _describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:500]
