"""The outbox relay: publishes what the message loop wrote to the outbox (CONTRACT §7, §8).

How it works
- Leadership. Among several service instances only one relay publishes: the one whose database session holds the
  outbox advisory lock (`storage.outbox.try_lead`). A leadership term is one such session (`storage.engine.
  one_session`: it can never be swapped for a fresh session that holds no lock) and one AMQP connection. Every
  statement of the term is fenced: it acts only if its own session holds the lock, and raises `NotLeading`
  otherwise. Any error, of the database or the broker, ends the term; nothing is retried inside it.
- Time fence. A fetch proves the lock at one instant. Its batch is published only if that happens within
  `takeover_grace_s / 2` of sending the fetch, and a new leader publishes nothing for `takeover_grace_s` after
  it took the lock. A relay that lost its session after a fetch has therefore handed its last batch to the
  broker before a successor publishes anything: two relays never publish in overlapping terms. A relay
  publishes nothing while the broker blocks its connection (frames would wait in its buffer).
- Order. A batch holds at most one row per ordering key (a certificate), so a certificate's next event is only
  published once the one before it is confirmed and marked; replies have no key. Each row is settled on its own
  (`publishers.settlement`): a failed row is tried again after a back-off and parked after `max_attempts`, and
  holds up nothing but the later rows of its own certificate.
- Confirm window. The batch is published back to back with `mandatory=True` on a channel in confirm mode;
  acks, nacks (with `multiple`) and returns are matched to the rows, and once all are confirmed the batch is
  settled in one transaction. pika is not thread-safe: the connection belongs to the thread that calls `run()`.
- Wake-ups. `wake()` may be called from any thread (the message loop calls it after each commit); it schedules a
  round on the relay's I/O loop at once, so replies go out within milliseconds. Without wake-ups the relay polls
  every `poll_s`.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pika
import structlog
from pika import spec
from sqlalchemy import Connection, Engine, text

from contracts.topology import EVENTS_EXCHANGE, recipient_binding, recipient_queue
from publishers import amqp
from publishers.settlement import UNROUTABLE_REPLY, recipient_of, settle
from storage import outbox as store
from storage.engine import one_session
from storage.outbox import OutboxRow

__all__ = ["OutboxRelay", "RelayStats", "UNROUTABLE_REPLY", "recipient_of"]

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


@dataclass
class RelayStats:
    """Counters for health checks and logs (written by the relay thread only)."""

    leader: bool = False
    connected: bool = False  # leading, connected to the broker and publishing
    terms: int = 0  # leadership terms begun
    backend_pid: int | None = None  # the database session of the current (or last) term
    published: int = 0  # rows marked published (or erased once published)
    batches: int = 0
    unroutable_replies: int = 0
    unsubscribed_events: int = 0
    recipient_queues_declared: int = 0
    nacked: int = 0
    parked: int = 0
    interruptions: int = 0  # leadership terms ended by a broker or database fault
    last_error: str | None = None


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

    `engine` says which database (each term opens a session of its own there, named `connection_name`).
    `recipient_queue_arguments` must be the arguments the service's topology declares `recipient.R` with (None:
    a plain durable queue), or re-declaring a missing recipient queue would differ from the topology's.
    """

    def __init__(self, amqp_url: str, engine: Engine, *, batch_size: int = 500, poll_s: float = 0.2,
                 log: Any = None, lead_poll_s: float = 3.0, confirm_timeout_s: float = 30.0,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0, takeover_grace_s: float = 1.0,
                 max_attempts: int = 10, retry_base_s: float = 0.5, retry_max_s: float = 30.0,
                 recipient_queue_arguments: Mapping[str, Any] | None = None,
                 connection_name: str = "intygstjanst-relay") -> None:
        if batch_size < 1 or max_attempts < 1:
            raise ValueError("batch_size and max_attempts must be at least 1")
        self.amqp_url = amqp_url
        self.engine = engine
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.lead_poll_s = lead_poll_s
        self.confirm_timeout_s = confirm_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.takeover_grace_s = takeover_grace_s
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
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

    # --- thread-safe controls ----------------------------------------------------------------------------------
    def wake(self) -> None:
        """Publish now rather than at the next poll (e.g. right after a commit that wrote to the outbox)."""
        with self._lock:
            if self._wake_pending or self._session is None:
                return
            self._wake_pending = True
            self._session.call_threadsafe(self._session.on_wake)

    def stop(self, flush: bool = True, timeout: float = 10.0) -> bool:
        """Ask `run()` to end. With `flush`, it first publishes what is due (if this relay leads), for at most
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
        """Publish until nothing is due or backing off (parked rows and the rows behind them wait), or `timeout`
        passes, in the calling thread, then disconnect. Returns the number of rows published, or None if another
        relay leads. For tests and tools; not while `run()` runs on the same object."""
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
        db = one_session(self.engine.url, application_name=self.connection_name)
        try:
            if not store.try_lead(db):
                return None
            led_at = time.monotonic()
            db.commit()  # the lock is the session's: it outlives the transaction
            self.stats.leader, self.stats.terms = True, self.stats.terms + 1
            self.stats.backend_pid = _log_term(db, self.log)
            return _Session(self, db, led_at, until_empty=until_empty, deadline=deadline).run()
        finally:
            self.stats.leader = False
            try:
                db.invalidate()  # end the session itself, so that the lock goes with it
                db.close()
            except Exception:  # pragma: no cover - a broken connection is closed anyway
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


def _log_term(db: Connection, log: Any) -> int:
    """Say which database session leads, and that it carries the keepalives that free the lock after a
    partition (`storage.engine`)."""
    pid, idle, interval, count = db.execute(text(
        "SELECT pg_backend_pid(), current_setting('tcp_keepalives_idle'), "
        "current_setting('tcp_keepalives_interval'), current_setting('tcp_keepalives_count')")).one()
    db.commit()
    log.info("relay leads", backend_pid=pid, tcp_keepalives_idle=idle, tcp_keepalives_interval=interval,
             tcp_keepalives_count=count)
    return pid


class _Session:
    """One leadership term: one AMQP connection and its I/O loop, driven by callbacks on the relay's thread."""

    def __init__(self, relay: OutboxRelay, db: Connection, led_at: float, *, until_empty: bool,
                 deadline: float | None) -> None:
        self.relay = relay
        self.db = db
        self.log = relay.log
        self.may_publish_at = led_at + relay.takeover_grace_s
        self.until_empty = until_empty
        self.deadline = deadline if deadline is not None else float("inf")
        self.stopping = False
        self.flush = True
        self.closing = False
        self.error: BaseException | None = None
        self.conn: pika.SelectConnection | None = None
        self.channel: Any = None
        self.published = 0
        self.blocked = False
        self.timers: dict[str, object] = {}
        # the batch in flight
        self.busy = False
        self.limit = relay.batch_size  # smaller while fetches are too slow to publish safely
        self.batch: list[OutboxRow] = []
        self.acked: list[bool] = []
        self.returned: set[int] = set()
        self.outstanding: dict[int, int] = {}  # delivery tag -> index in batch, ascending tags
        self.by_message_id: dict[str, deque[int]] = {}
        self.next_tag = 0

    # --- lifecycle --------------------------------------------------------------------------------------------
    def run(self) -> int:
        params = amqp.next_node(self.relay.amqp_url, self.relay.connection_name)
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
            except Exception as exc:  # any fault ends the term: nothing is retried on another session
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
        self._timer("poll", max(0.0, self.may_publish_at - time.monotonic()), self._pump)

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if not self.closing:
            self._fail(reason)

    def _on_blocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = True
        self._cancel("confirm")
        self.log.warning("broker blocks publishing (resource alarm)")

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = False
        self.log.info("broker unblocked publishing")
        if self.busy:
            self._timer("confirm", self.relay.confirm_timeout_s, self._on_confirm_timeout)
        else:
            self._pump()

    def on_wake(self) -> None:
        self.relay._woken()
        if self.closing:
            return
        if not self.busy and self.channel is not None:  # a busy session looks again once its batch is settled
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
        """One round: fetch the next batch and publish it; `_settle` runs once all of it is confirmed."""
        if self.closing:
            return
        if self.busy:
            return  # `_settle` pumps again
        self._cancel("poll")
        if (self.stopping and not self.flush) or time.monotonic() >= self.deadline:
            self._close()
            return
        if self.blocked:
            return  # `_on_unblocked` pumps again
        if time.monotonic() < self.may_publish_at:
            self._timer("poll", self.may_publish_at - time.monotonic(), self._pump)
            return
        fetched_from = time.monotonic()
        rows = store.unpublished(self.db, self.limit)  # raises NotLeading without the lock
        self.db.commit()
        if not rows:
            if self.stopping or (self.until_empty and not store.retrying(self.db)):
                self._close()
            else:
                self._timer("poll", self.relay.poll_s, self._pump)
            self.db.commit()
            return
        if time.monotonic() - fetched_from > self.relay.takeover_grace_s / 2:
            # The lock was proven too long ago: a successor may be publishing by now. Prove it again, with a
            # smaller batch (a busy database or a starved process must not stop the relay altogether).
            self.limit = max(1, self.limit // 2)
            self.log.warning("outbox batch fetched too slowly to publish safely; fetching again",
                             ms=round((time.monotonic() - fetched_from) * 1000), batch_size=self.limit)
            self._timer("poll", 0, self._pump)
            return
        self.limit = min(self.relay.batch_size, self.limit * 2)
        self.busy = True
        self.batch, self.acked, self.returned = rows, [False] * len(rows), set()
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
        # The return of a message comes before its confirm: it is the first row with this message_id not yet
        # returned (two rows may share a message_id: the same reply stored again for a re-sent request).
        waiting = self.by_message_id.get(properties.message_id, deque())
        while waiting and waiting[0] in self.returned:
            waiting.popleft()
        if not waiting:
            self.log.warning("return of an unknown message", routing_key=method.routing_key)
            return
        self.returned.add(waiting.popleft())

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, spec.Basic.Ack)
        if method.multiple:
            tags = [tag for tag in self.outstanding if tag <= method.delivery_tag]
        else:
            tags = [method.delivery_tag]
        for tag in tags:
            index = self.outstanding.pop(tag, None)
            if index is not None:
                self.acked[index] = acked
        if self.busy and not self.outstanding:
            self._settle()

    def _settle(self) -> None:
        """Mark the confirmed rows, count the failed ones (parking those out of attempts), in one transaction."""
        self._cancel("confirm")
        batch = self.batch
        outcome = settle(batch, self.acked, self.returned)
        published = store.mark_published(self.db, outcome.published, outcome.notes)
        parked = store.mark_failed(self.db, outcome.failed, max_attempts=self.relay.max_attempts,
                                   retry_base_s=self.relay.retry_base_s, retry_max_s=self.relay.retry_max_s)
        self.db.commit()

        stats = self.relay.stats
        stats.batches += 1
        stats.published += published
        stats.unroutable_replies += outcome.unroutable_replies
        stats.unsubscribed_events += outcome.unsubscribed_events
        stats.nacked += outcome.nacked
        stats.parked += len(parked)
        self.published += published
        for row_id, error in outcome.failed.items():
            self.log.warning("outbox row not published; it will be tried again", row_id=row_id, error=error)
        for row in parked:
            self.log.error("outbox row PARKED: it failed every attempt and is skipped, with the later events of "
                           "its certificate, until an operator runs `intygstjanst outbox unpark`",
                           row_id=row.id, routing_key=row.routing_key, message_id=row.message_id,
                           attempts=row.attempts, error=row.error)
        self.busy, self.batch, self.acked, self.returned, self.by_message_id = False, [], [], set(), {}
        if outcome.missing_recipients:
            self._declare_recipients(outcome.missing_recipients)
        else:  # there may be more (the next event of a certificate, say); an empty batch waits for the poll
            self._timer("poll", 0, self._pump)

    def _declare_recipients(self, recipients: list[str]) -> None:
        """Declare each missing `recipient.R` again and bind it, then go on publishing."""
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


def _describe(exc: BaseException) -> str:
    text_ = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text_}"[:500]
