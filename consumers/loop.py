"""The message loop: one consumer thread per service queue, each with its own pika BlockingConnection (pika is
not thread-safe), manual acks and `prefetch` unacknowledged deliveries in flight.

A batch is up to `batch_size` deliveries, gathered for at most `batch_wait_ms` after the first one arrives. It is
handled in ONE database transaction, each message inside its own savepoint so that a failing message rolls back
alone; then, in this order:

1. commit (the inbox, the state change and the outbox rows of every message of the batch);
2. a care giver leaving (`Processed.more`) is continued in fresh transactions until done;
3. publish, with publisher confirms, what goes out directly: query replies, error replies, retry copies, dead
   letters;
4. acknowledge (one `multiple` ack when the whole batch is settled);
5. nudge the outbox relay.

A crash anywhere before 4 makes the broker redeliver; the inbox answers a redelivery with the stored reply and
changes nothing, so at-least-once delivery is safe. A transient database fault rolls back the whole transaction
(its locks are what the other side waits for): the message that hit it goes to the retry path and the rest of the
batch runs again in a new transaction; a database that is down sends the whole batch to the retry path. Retry and
dead-letter rules: `consumers.retry`.
"""
from __future__ import annotations

import datetime as dt
import os
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika
import psycopg
from pika.exceptions import AMQPError, NackError, UnroutableError
from sqlalchemy import exc as sa_exc

from consumers import pipeline, retry
from consumers.pipeline import Envelope, Invalid, Parsed, Processed, RetryLater
from contracts.replies import Code, Reply
from contracts.topology import SERVICE_QUEUES, dlq
from publishers.replies import DirectPublisher, copy_properties
from service.logging import get_logger, patient_hash, scrub
from storage.errors import RacedWithPurge, is_transient
from storage.uow import SqlUnitOfWork

# Queues whose messages may be handled in any order, so `parallel_consumers` threads may share them: two
# registrations never depend on each other (the same one twice is idempotent) and queries change nothing.
ORDER_FREE_QUEUES = frozenset({"intyg.registration", "intyg.query"})
MAX_ROUNDS = 3  # transactions per batch before every message still pending goes to the retry path
IDLE_POLL_S = 0.25
STABLE_SESSION_S = 10.0  # a session that consumed this long resets the reconnect back-off  # how often an idle consumer looks at the stop flag


def policy_from(settings: Any) -> pipeline.Policy:
    roles = {user: (r.role, frozenset(r.care_giver_ids) if r.care_giver_ids is not None else None)
             for user, r in settings.roles.items()}
    return pipeline.Policy(catalogue=settings.catalogue, max_body_bytes=settings.max_body_bytes,
                           enforce_roles=settings.enforce_roles, roles=roles,
                           bulk_batch_size=settings.bulk_batch_size)


def connection_parameters(amqp_url: str, name: str) -> pika.URLParameters:
    params = pika.URLParameters(amqp_url)
    params.client_properties = {"connection_name": name, "product": "intygstjanst"}
    if "blocked_connection_timeout" not in amqp_url:
        params.blocked_connection_timeout = 120  # a broker alarm that never clears ends in a reconnect
    return params


class Backoff:
    """Exponential, capped, jittered (between half and all of the nominal delay)."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 30.0) -> None:
        self.base_s, self.cap_s, self.failures = base_s, cap_s, 0

    def next(self) -> float:
        nominal = min(self.cap_s, self.base_s * 2 ** self.failures)
        self.failures += 1
        return random.uniform(nominal / 2, nominal)

    def reset(self) -> None:
        self.failures = 0


# --------------------------------------------------------------------------------------------------------------
# One message on its way through a batch
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Delivery:
    tag: int
    exchange: str
    routing_key: str
    properties: pika.BasicProperties
    body: bytes


@dataclass
class Item:
    delivery: Delivery
    envelope: Envelope
    past: retry.History
    parsed: Parsed | None = None
    invalid: Invalid | None = None
    processed: Processed | None = None
    not_yet: RetryLater | None = None
    fault: BaseException | None = None
    ms: float = 0.0
    committed: bool = False  # its effects are committed (so it must not run again in this delivery)
    settled: bool = False

    @property
    def message_id(self) -> str | None:
        return self.envelope.message_id

    def reset(self) -> None:
        self.processed = self.not_yet = self.fault = None


def describe_fault(exc: BaseException) -> str:
    """A short text for logs and `x-intyg-error`: what went wrong, never the data (no personnummer, no SQL
    parameters)."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, RacedWithPurge):
            return str(current)
        if isinstance(current, psycopg.Error):
            state = current.sqlstate
            if state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03"):
                return "database unavailable"
            if state in ("40001", "40P01"):
                return "database deadlock or serialization failure"
            if state == "55P03":
                return "database lock timeout"
            if state == "57014":
                return "database statement timeout"
            if state == "23505":
                return "raced with another delivery (unique key)"
            primary = getattr(current.diag, "message_primary", None) or type(current).__name__
            return f"database error {state}: {scrub(primary)}"
        if isinstance(current, (sa_exc.TimeoutError, sa_exc.DisconnectionError)):
            return "database unavailable"
        if isinstance(current, sa_exc.DBAPIError) and current.orig is not None:
            current = current.orig
            continue
        if isinstance(current, sa_exc.DBAPIError):
            return "database unavailable" if current.connection_invalidated else f"database error ({type(current).__name__})"
        break
    text = scrub(str(exc)).splitlines()[0][:200] if str(exc) else ""
    return f"unexpected {type(exc).__name__}" + (f": {text}" if text else "")


def _patient_of(parsed: Parsed | None) -> str | None:
    if parsed is None:
        return None
    message = parsed.message
    fields = type(message).model_fields  # not getattr(..., None): a missing attribute costs pydantic an exception
    pid = message.patient_id if "patient_id" in fields else None
    if pid is None and "certificate" in fields and message.certificate is not None:
        pid = message.certificate.patient_id
    return pid


# --------------------------------------------------------------------------------------------------------------
# The consumer thread
# --------------------------------------------------------------------------------------------------------------


class Consumer(threading.Thread):
    """Consumes one service queue until `stop()`; reconnects after broker trouble with back-off."""

    def __init__(self, queue: str, settings: Any, engine: Any, *, relay: Any = None,
                 declare: Callable[[Any], Any] | None = None, policy: pipeline.Policy | None = None,
                 clock: Callable[[], dt.datetime] | None = None, index: int = 0) -> None:
        super().__init__(name=f"consumer-{queue}-{index}", daemon=True)
        if queue not in SERVICE_QUEUES:
            raise ValueError(f"not a service queue: {queue}")
        self.queue = queue
        self.dlq = dlq(queue)
        self.settings = settings
        self.engine = engine
        self.relay = relay
        self.declare = declare
        self.policy = policy or policy_from(settings)
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.log = get_logger("intygstjanst.consumer", queue=queue, **({"consumer": index} if index else {}))
        self.index = index
        self.own_user = pika.URLParameters(settings.amqp_url).credentials.username
        self.crash_after_commit = settings.crash_after_commit
        self._stopping = threading.Event()
        self._consuming = threading.Event()  # set while a session consumes (for tests and start-up)
        self._buffer: deque[Delivery] = deque()
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._publisher: Any = None
        self._cancelled_by_broker = False
        self._redeclare = False
        self.handled = 0  # messages settled (for tests and metrics)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the thread to finish its batch, give back what it holds and close. Join it afterwards."""
        self._stopping.set()

    def wait_consuming(self, timeout: float | None = None) -> bool:
        return self._consuming.wait(timeout)

    def run(self) -> None:
        backoff = Backoff(cap_s=self.settings.reconnect_max_s)
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self._session()
            except Exception as exc:  # noqa: BLE001 - whatever happened, the thread never dies
                if self._consuming.is_set() and time.monotonic() - started > STABLE_SESSION_S:
                    backoff.reset()  # it had been working: start again from a short pause
                self._consuming.clear()
                self._close()
                if isinstance(exc, AMQPError):
                    why = f"broker connection lost ({type(exc).__name__}: {exc})"
                elif isinstance(exc, (ConnectionError, OSError)):
                    why = f"broker unreachable ({exc})"
                else:  # a bug in the loop itself
                    self.log.error("consumer failed", exc_info=exc)
                    why = "consumer failed"
                self._broker_trouble(backoff, why)
            finally:
                self._consuming.clear()
                self._close()
        self.log.info("consumer stopped")

    def _broker_trouble(self, backoff: Backoff, why: str) -> None:
        if self._stopping.is_set():
            return
        delay = backoff.next()
        self.log.warning(f"{why}; reconnecting in {delay:.1f}s", attempt=backoff.failures)
        self._stopping.wait(delay)

    def _close(self) -> None:
        self._buffer.clear()  # unacknowledged: the broker redelivers them
        connection, self._connection = self._connection, None
        self._channel = self._publisher = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
                pass

    # -- a session: one connection, consuming until stopped or broken -------------------------------------------

    def _session(self) -> None:
        self._connection = connection = pika.BlockingConnection(
            connection_parameters(self.settings.amqp_url, f"intygstjanst {self.queue} #{self.index}"))
        publish_channel = connection.channel()
        if self.declare is not None:
            self.declare(publish_channel)
        self._publisher = DirectPublisher(publish_channel)
        self._channel = channel = connection.channel()
        channel.basic_qos(prefetch_count=self.settings.prefetch)
        self._cancelled_by_broker = False
        channel.add_on_cancel_callback(self._on_broker_cancel)
        tag = channel.basic_consume(self.queue, self._on_message, auto_ack=False)
        self._consuming.set()
        self.log.info("consuming", prefetch=self.settings.prefetch, batch_size=self.settings.batch_size)
        while not self._stopping.is_set() and not self._cancelled_by_broker:
            batch = self._gather(connection)
            if batch:
                self._handle(batch)
            if self._redeclare and self.declare is not None:
                self._redeclare = False
                self.declare(publish_channel)
        if self._cancelled_by_broker:
            raise pika.exceptions.ConsumerCancelled(f"broker cancelled the consumer of {self.queue}")
        # Stopping: no new deliveries; what is buffered but not started goes back to the queue at once.
        channel.basic_cancel(tag)
        if self._buffer:
            channel.basic_nack(delivery_tag=self._buffer[-1].tag, multiple=True, requeue=True)
            self._buffer.clear()

    def _on_message(self, _channel: Any, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        self._buffer.append(Delivery(method.delivery_tag, method.exchange, method.routing_key, properties, body))

    def _on_broker_cancel(self, _frame: Any) -> None:
        self._cancelled_by_broker = True

    def _gather(self, connection: pika.BlockingConnection) -> list[Delivery]:
        """Up to batch_size deliveries, waiting at most batch_wait_ms after the first."""
        size = max(1, self.settings.batch_size)
        deadline: float | None = None
        while len(self._buffer) < size:
            if self._stopping.is_set() or self._cancelled_by_broker:
                break
            if not self._buffer:
                connection.process_data_events(time_limit=IDLE_POLL_S)
                continue
            if deadline is None:
                deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            connection.process_data_events(time_limit=remaining)
        return [self._buffer.popleft() for _ in range(min(size, len(self._buffer)))]

    def _keepalive(self) -> None:
        """Let pika answer heartbeats during long work (deliveries only land in the buffer)."""
        if self._connection is not None:
            self._connection.process_data_events(time_limit=0)

    # -- a batch ---------------------------------------------------------------------------------------------

    def _handle(self, batch: Sequence[Delivery]) -> None:
        now = self.clock()
        items = [self._item(d, now) for d in batch]
        for item in items:
            started = time.perf_counter()
            try:
                item.parsed = pipeline.parse(item.envelope, self.policy)
            except Invalid as invalid:
                item.invalid = invalid
            except Exception as exc:  # noqa: BLE001 - a bug in parsing: bounded retries like any fault
                item.fault = exc
            item.ms += (time.perf_counter() - started) * 1000

        todo = [i for i in items if i.parsed is not None and i.fault is None]
        if todo:
            self._transact(todo, now)
            for item in todo:
                if item.processed is not None and item.processed.more and item.fault is None:
                    self._continue(item)
        self._settle(items, now)

    def _item(self, delivery: Delivery, now: dt.datetime) -> Item:
        props = delivery.properties
        returned = (retry.came_back(delivery.exchange, delivery.routing_key, self.queue)
                    and props.user_id == self.own_user)
        past = retry.history(props.headers, now, returned=returned)
        headers = dict(props.headers or {})
        user_id = props.user_id
        if returned:  # our own retry copy: the sender travelled in a header (see retry.retry_headers)
            user_id = retry.original_user(headers)
        envelope = Envelope(routing_key=retry.routing_key(delivery.routing_key, past), body=delivery.body,
                            message_id=props.message_id, reply_to=props.reply_to,
                            correlation_id=props.correlation_id, type=props.type, user_id=user_id,
                            content_type=props.content_type, headers=headers)
        return Item(delivery, envelope, past)

    def _transact(self, todo: list[Item], now: dt.datetime) -> None:
        """Run every parsed message of the batch in one transaction and commit.

        First optimistically without savepoints (two round trips less per message): almost every batch has no
        failing message. If one raises anything but a transient fault, the transaction is rolled back and the
        batch runs again with a savepoint per message, so that only the failing message is undone. A transient
        fault gives up the transaction either way: the message that hit it goes to the retry path and the others
        run again in a fresh transaction (at most MAX_ROUNDS transactions, then the rest goes to the retry path).

        Writes are buffered (`storage.writes`) and a warm-up query answers the batch's inbox and certificate
        lookups, so a batch of new registrations reads nothing and inserts with one statement per table. The price:
        an insert fails when the buffer is flushed, possibly while a later message runs or at commit, where it is
        not known whose row failed (`uow.flush_failed`). That is handled like any failure in the optimistic pass:
        the batch runs again with a savepoint per message, each flushed when its savepoint ends, which pins the
        failure on its message (a unique violation of a raced key is then transient: that message is retried, and
        its retry reads the row that won).
        """
        pending = list(todo)
        savepoints = False
        rounds = 0
        culprit: Item | None = None
        while rounds < MAX_ROUNDS:
            for item in pending:
                item.reset()
            culprit, fall_back = None, False
            try:
                with SqlUnitOfWork(self.engine) as uow:
                    self._warm(uow, pending)
                    for item in pending:
                        started = time.perf_counter()
                        try:
                            if savepoints:
                                with uow.savepoint():
                                    item.processed = pipeline.process(item.parsed, uow, self.policy, now)
                            else:
                                item.processed = pipeline.process(item.parsed, uow, self.policy, now)
                        except RetryLater as not_yet:
                            if not savepoints:
                                fall_back = True
                                break
                            item.not_yet = not_yet
                        except Exception as exc:  # noqa: BLE001
                            if not savepoints and uow.flush_failed:
                                # Queued inserts of earlier messages failed when this one's statement flushed
                                # them: a savepoint per message (each flushed at its end) tells whose they were.
                                fall_back = True
                                break
                            if is_transient(exc):
                                culprit, item.fault = item, exc
                                break
                            if not savepoints:
                                fall_back = True
                                break
                            item.fault = exc  # a bug: its savepoint is rolled back, the rest goes on
                        finally:
                            item.ms += (time.perf_counter() - started) * 1000
                    if culprit is None and not fall_back and not savepoints:
                        try:
                            uow.flush()  # the batch's queued inserts; which message's failed is not known here
                        except Exception:  # noqa: BLE001 - find it with a savepoint per message, like any failure
                            fall_back = True
                    if culprit is None and not fall_back:
                        uow.commit()
            except Exception as exc:  # noqa: BLE001 - begin, commit or rollback failed: the whole batch
                for item in pending:
                    item.reset()
                    item.fault = exc
                return
            if fall_back:  # rolled back; once more, one savepoint per message (not counted as a round)
                savepoints = True
                continue
            if culprit is None:
                for item in pending:
                    item.committed = item.processed is not None
                self._after_commit(pending)
                return
            # The transaction is gone (rolled back on leaving the with block): the culprit goes to the retry
            # path, the others run again in a fresh transaction.
            rounds += 1
            pending = [i for i in pending if i is not culprit]
            if not pending:
                return
        for item in pending:  # too many transient faults in a row: let the retry path sort them out
            item.reset()
            item.fault = culprit.fault if culprit is not None else RuntimeError("too many transient faults")

    @staticmethod
    def _warm(uow: SqlUnitOfWork, pending: Sequence[Item]) -> None:
        """One query tells which of the batch's commands are new and which certificates do not exist yet, so that
        registering a batch of new certificates reads nothing more (see `SqlUnitOfWork.warm`)."""
        commands = [i.parsed for i in pending if i.parsed is not None and not i.parsed.route.query]
        if commands:
            uow.warm([p.message_id for p in commands], [pipeline.subject(p) for p in commands])

    def _continue(self, item: Item) -> None:
        """A care giver leaving: commit and go on, one bounded batch per transaction, until done."""
        while item.processed is not None and item.processed.more:
            self._keepalive()
            started = time.perf_counter()
            try:
                with SqlUnitOfWork(self.engine) as uow:
                    item.processed = pipeline.process(item.parsed, uow, self.policy, self.clock())
                    uow.commit()
            except Exception as exc:  # noqa: BLE001 - work so far is committed; a retry resumes it
                item.processed, item.fault = None, exc
                return
            finally:
                item.ms += (time.perf_counter() - started) * 1000
            self._after_commit([item])

    def _after_commit(self, items: Sequence[Item]) -> None:
        if self.crash_after_commit and any(i.message_id == self.crash_after_commit for i in items):
            self.log.warning("crash injected after commit", message_id=self.crash_after_commit)
            os.kill(os.getpid(), signal.SIGKILL)

    # -- after the commit: replies, retry copies, dead letters, acks -------------------------------------------------

    def _settle(self, items: Sequence[Item], now: dt.datetime) -> None:
        for item in items:
            try:
                self._publish_outcome(item, now)
                item.settled = True
            except (UnroutableError, NackError) as exc:
                # The channel is still fine; the delivery goes back to the queue and the topology is declared
                # again (someone may have deleted a DLQ or delay queue).
                self.log.error("could not publish what settles a message; requeueing it",
                               message_id=item.message_id, error=type(exc).__name__)
                self._redeclare = True
        channel = self._channel
        if all(i.settled for i in items):
            channel.basic_ack(delivery_tag=items[-1].delivery.tag, multiple=True)
        else:
            for item in items:
                if item.settled:
                    channel.basic_ack(delivery_tag=item.delivery.tag)
                else:
                    channel.basic_nack(delivery_tag=item.delivery.tag, requeue=True)
        self.handled += sum(1 for i in items if i.settled)
        if self.relay is not None and any(i.committed for i in items):
            self.relay.wake()

    def _publish_outcome(self, item: Item, now: dt.datetime) -> None:
        envelope = item.envelope
        if item.invalid is not None:
            code, reason = item.invalid.code, item.invalid.message
            if envelope.reply_to:
                self._reply(envelope, pipeline.error_reply(envelope, code, reason))
            self._dead_letter(item, code.value, reason, now)
            self._log(item, code.value, f"invalid message, dead-lettered to {self.dlq}: {code.value}: {reason}",
                      level="warning")
            return
        if item.not_yet is not None:
            decision = retry.after_not_yet(item.past, self.settings, now)
            reply = item.not_yet.reply
            code = reply.code.value if reply.code else "NOT_FOUND"
            if decision.retry:
                self._retry(item, decision, code, reply.message)
                self._log(item, "WAITING", f"not there yet; {decision.describe}: {reply.message}",
                          attempt=decision.attempt, delay_s=decision.delay_s)
            else:
                if envelope.reply_to:
                    self._reply(envelope, reply)
                self._dead_letter(item, code, f"still not found after {self.settings.revoke_wait_s:g}s: "
                                             f"{reply.message}", now)
                self._log(item, code, f"dead-lettered to {self.dlq}: {code} after waiting "
                                      f"{self.settings.revoke_wait_s:g}s ({decision.attempt} attempts)",
                          level="warning", attempt=decision.attempt)
            return
        if item.fault is not None:
            self._fault(item, now)
            return
        processed = item.processed
        assert processed is not None
        if processed.direct_reply and processed.reply is not None and envelope.reply_to:
            self._reply(envelope, processed.reply)
        self._log(item, processed.outcome, "handled")

    def _fault(self, item: Item, now: dt.datetime) -> None:
        exc = item.fault
        assert exc is not None
        transient = is_transient(exc)
        reason = describe_fault(exc)
        decision = retry.after_fault(item.past, self.settings)
        bug = {} if transient else {"exc_info": exc}
        if decision.retry:
            self._retry(item, decision, Code.UNAVAILABLE.value, reason)
            self._log(item, "RETRY", f"{decision.describe}: {reason}", level="warning" if transient else "error",
                      attempt=decision.attempt, delay_s=decision.delay_s, **bug)
            return
        envelope = item.envelope
        if envelope.reply_to:
            self._reply(envelope, Reply.for_code(Code.UNAVAILABLE, envelope.message_id or "",
                                                 "the service could not handle the message now; try again later"))
        self._dead_letter(item, Code.UNAVAILABLE.value, reason, now)
        self._log(item, Code.UNAVAILABLE.value,
                  f"dead-lettered to {self.dlq}: UNAVAILABLE after {decision.attempt} attempts: {reason}",
                  level="error", attempt=decision.attempt, **bug)

    def _reply(self, envelope: Envelope, reply: Reply) -> None:
        assert envelope.reply_to is not None
        self._publisher.reply(envelope.reply_to, reply, correlation_id=envelope.reply_correlation_id)

    def _retry(self, item: Item, decision: retry.Decision, code: str, error: str) -> None:
        props = item.delivery.properties
        headers = retry.retry_headers(props.headers, item.past, item.envelope.routing_key,
                                      user_id=item.envelope.user_id, code=code, error=error)
        queue = retry.retry_queue(self.queue, decision.delay_s or 0)
        self._publisher.copy(queue, item.delivery.body, copy_properties(props, headers, user_id=self.own_user))

    def _dead_letter(self, item: Item, code: str, error: str, now: dt.datetime) -> None:
        props = item.delivery.properties
        headers = retry.dead_letter_headers(props.headers, item.past, item.envelope.routing_key,
                                            user_id=item.envelope.user_id, code=code, error=error, now=now)
        self._publisher.copy(self.dlq, item.delivery.body, copy_properties(props, headers))

    def _log(self, item: Item, outcome: str, event: str, *, level: str = "info", **extra: Any) -> None:
        parsed = item.parsed
        fields: dict[str, Any] = {
            "type": item.envelope.routing_key,
            "certificate_id": pipeline.subject(parsed) if parsed is not None else None,
            "outcome": outcome,
            "ms": round(item.ms, 2),
            "message_id": item.message_id,
        }
        patient = _patient_of(parsed)
        if patient:
            fields["patient"] = patient_hash(patient)
        if item.past.attempts:
            fields.setdefault("attempt", item.past.attempt)
        fields.update(extra)
        getattr(self.log, level)(event, **fields)


def consumer_count(queue: str, settings: Any) -> int:
    return max(1, int(getattr(settings, "parallel_consumers", 1))) if queue in ORDER_FREE_QUEUES else 1


def make_consumers(settings: Any, engine: Any, *, relay: Any = None, queues: Sequence[str] | None = None,
                   declare: Callable[[Any], Any] | None = None) -> list[Consumer]:
    """The consumer threads (not started) for `queues` (default: every service queue)."""
    return [Consumer(q, settings, engine, relay=relay, declare=declare, index=i)
            for q in (queues or SERVICE_QUEUES) for i in range(consumer_count(q, settings))]


__all__ = ["Backoff", "Consumer", "consumer_count", "describe_fault", "make_consumers", "policy_from"]
