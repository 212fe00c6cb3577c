"""The message loop: one consumer thread per consumed queue, each with its own pika BlockingConnection (pika is
not thread-safe), manual acks and `prefetch` unacknowledged deliveries in flight.

A batch is up to `batch_size` deliveries, gathered for at most `batch_wait_ms` after the first one arrives:
1. read: every property and header is checked before use (`consumers.envelope`);
2. parse and apply in one database transaction, commit (`consumers.batch`);
3. a care giver leaving (`Processed.more`) is continued in fresh transactions until done;
4. settle each message (`consumers.outcome`): its reply, in one AMQP transaction for the batch
   (`publishers.replies.ReplyBatch`), and, each with a publisher confirm, retry copies and dead letters;
5. acknowledge what is settled (one `multiple` ack when the whole batch is), once the broker holds the replies;
   a message whose settlement cannot be published for a reason of its own is rejected, and the broker
   dead-letters it (the queue's dead-letter target); trouble with the broker itself ends the session, and the
   broker redelivers;
6. nudge the outbox relay (events).

A crash anywhere before 5 makes the broker redeliver; the inbox answers a redelivery with the stored reply and
changes nothing, so at-least-once delivery is safe. A message that crashes the consumer on every delivery is
dead-lettered by the broker after the queue's delivery limit.
"""
from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from importlib import import_module
from typing import Any

import pika
import structlog
from pika.exceptions import AMQPError, NackError, UnroutableError

from consumers import batch, outcome, pipeline, retry
from consumers.batch import Item
from consumers.envelope import Delivery, Reader
from consumers.metrics import NO_METRICS, LoopMetrics
from consumers.pipeline import Invalid
from contracts.replies import Code
from contracts.topology import CONSUMED_QUEUES, SERVICE_QUEUES, UNROUTED, dlq
from domain.privacy import patient_hash
from publishers import amqp
from publishers.replies import DirectPublisher, ReplyBatch, copy_properties
from storage.uow import SqlUnitOfWork

# Queues whose messages may be handled in any order, so `parallel_consumers` threads may share them: two
# registrations never depend on each other (the same one twice is idempotent) and queries change nothing.
ORDER_FREE_QUEUES = frozenset({"intyg.registration", "intyg.query"})
IDLE_POLL_S = 0.25  # how often an idle consumer looks at the stop flag
STABLE_SESSION_S = 10.0  # a session that consumed this long resets the reconnect back-off


def policy_from(settings: Any) -> pipeline.Policy:
    roles = {user: (r.role, frozenset(r.care_giver_ids) if r.care_giver_ids is not None else None)
             for user, r in settings.roles.items()}
    return pipeline.Policy(catalogue=settings.catalogue, max_body_bytes=settings.max_body_bytes,
                           enforce_roles=settings.enforce_roles, roles=roles,
                           bulk_batch_size=settings.bulk_batch_size,
                           access_log_required=settings.access_log_required)


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


class Consumer(threading.Thread):
    """Consumes one queue until `stop()`; reconnects after broker trouble with back-off."""

    def __init__(self, queue: str, settings: Any, engine: Any, *, relay: Any = None,
                 declare: Callable[[Any], Any] | None = None, policy: pipeline.Policy | None = None,
                 clock: Callable[[], dt.datetime] | None = None, index: int = 0,
                 metrics: LoopMetrics = NO_METRICS, tracer: Any = None) -> None:
        super().__init__(name=f"consumer-{queue}-{index}", daemon=True)
        if queue not in CONSUMED_QUEUES:
            raise ValueError(f"not a consumed queue: {queue}")
        self.queue = queue
        self.dlq = dlq(queue)
        self.settings = settings
        self.engine = engine
        self.relay = relay
        self.declare = declare
        self.policy = policy or policy_from(settings)
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.log = structlog.get_logger("intygstjanst.consumer").bind(
            queue=queue, **({"consumer": index} if index else {}))
        self.index = index
        self.metrics = metrics
        self.tracer = tracer  # an opentelemetry Tracer when tracing is on; None: no spans, no attributes built
        # `consumers.tracing`, loaded (with the OpenTelemetry API) only when there is a tracer to make spans with
        self.spans: Any = import_module("consumers.tracing") if tracer is not None else None
        self.own_user = pika.URLParameters(settings.amqp_url).credentials.username
        self.signer = retry.Signer(settings.signing_key)
        self.reader = Reader(queue, self.own_user, self.signer)
        self._stopping = threading.Event()
        self._consuming = threading.Event()  # set while a session consumes (for tests and start-up)
        self._buffer: deque[Delivery] = deque()
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._publisher: Any = None
        self._replies: Any = None
        self._cancelled_by_broker = False
        self._redeclare = False
        self.handled = 0  # messages settled (for tests and metrics)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the thread to finish its batch, give back what it holds and close. Join it afterwards."""
        self._stopping.set()

    def wait_consuming(self, timeout: float | None = None) -> bool:
        return self._consuming.wait(timeout)

    @property
    def consuming(self) -> bool:
        return self._consuming.is_set()

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
        self.metrics.reconnect(self.queue)
        delay = backoff.next()
        self.log.warning(f"{why}; reconnecting in {delay:.1f}s", attempt=backoff.failures)
        self._stopping.wait(delay)

    def _close(self) -> None:
        self._buffer.clear()  # unacknowledged: the broker redelivers them
        connection, self._connection = self._connection, None
        self._channel = self._publisher = self._replies = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
                pass

    # -- a session: one connection, consuming until stopped or broken -------------------------------------------

    def _session(self) -> None:
        self._connection = connection = amqp.connect(amqp.Broker.from_settings(self.settings),
                                                     f"intygstjanst {self.queue} #{self.index}")
        publish_channel = connection.channel()
        if self.declare is not None:
            self.declare(publish_channel)
        self._publisher = DirectPublisher(publish_channel)
        self._replies = ReplyBatch(connection.channel)
        self._channel = channel = connection.channel()
        channel.basic_qos(prefetch_count=self.settings.prefetch)
        self._cancelled_by_broker = False
        channel.add_on_cancel_callback(self._on_broker_cancel)
        tag = channel.basic_consume(self.queue, self._on_message, auto_ack=False)
        self._consuming.set()
        self.log.info("consuming", prefetch=self.settings.prefetch, batch_size=self.settings.batch_size)
        while not self._stopping.is_set() and not self._cancelled_by_broker:
            deliveries = self._gather(connection)
            if deliveries:
                self._handle(deliveries)
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

    def _handle(self, deliveries: Sequence[Delivery]) -> None:
        now = self.clock()
        items = [self._item(d, now, len(deliveries)) for d in deliveries]
        try:
            new_uow = lambda: SqlUnitOfWork(self.engine)  # noqa: E731
            self.metrics.batch(self.queue, len(items))
            batch.apply(items, new_uow, self.policy, now,
                        lambda reason: self.metrics.transaction_retry(self.queue, reason))
            self._committed(items)
            for item in items:
                if item.processed is not None and item.processed.more and item.fault is None:
                    batch.continue_bulk(item, new_uow, self.policy, self.clock, self._keepalive, self._committed)
            self._settle(items, now)
        finally:
            for item in items:  # not settled (the session broke): the broker redelivers, a new span follows
                if item.span is not None:
                    self.spans.finish(item.span, "REDELIVERED", failed=True)

    def _item(self, delivery: Delivery, now: dt.datetime, batch_size: int) -> Item:
        envelope, past = self.reader.read(delivery, now)
        item = Item(delivery, envelope, past)
        if self.tracer is not None:
            item.span = self.spans.start(self.tracer, self.queue, delivery, envelope, batch_size)
            item.trace = self.spans.headers(item.span)
        if self.queue == UNROUTED:  # §1: whatever arrives here has a type no service queue takes
            item.invalid = Invalid(Code.INVALID_MESSAGE, f"unknown message type {pipeline.quoted(envelope.routing_key)}")
        elif envelope.problem is None and envelope.routing_key not in SERVICE_QUEUES[self.queue]:
            # it reached this queue some other way than through the contract's bindings
            item.invalid = Invalid(Code.INVALID_MESSAGE,
                                   f"unknown routing key {pipeline.quoted(envelope.routing_key)} for {self.queue}")
        else:
            item.parse(self.policy)
        return item

    def _committed(self, items: Sequence[Item]) -> None:
        """After a commit (the tests' crash injection hooks in here)."""

    # -- after the commit: replies, retry copies, dead letters, acks -------------------------------------------------

    def _settle(self, items: Sequence[Item], now: dt.datetime) -> None:
        settled: list[bool] = []
        for item in items:
            settled.append(self._settle_one(item, now))
        refused = self._replies.commit()
        if refused:
            self.log.warning("a requester's queue refused its reply; the batch's replies were sent one by one",
                             refused=refused)
            self.metrics.replies_refused(self.queue, refused)
        channel = self._channel
        if all(settled):
            channel.basic_ack(delivery_tag=items[-1].delivery.tag, multiple=True)
        else:
            for item, ok in zip(items, settled):
                if ok:
                    channel.basic_ack(delivery_tag=item.delivery.tag)
        self.handled += len(items)
        if self.relay is not None and any(i.committed for i in items):
            self.relay.wake()

    def _settle_one(self, item: Item, now: dt.datetime) -> bool:
        """Publish what settles `item`; True when it may be acknowledged. A failure of this message alone never
        reaches the rest of the batch: it is requeued (the topology may be missing a queue: declared again) or
        rejected to the broker's dead-letter target; only a broken connection ends the session."""
        span, item.span = item.span, None
        what, failed = "REDELIVERED", True  # unless settled: the connection broke, the broker redelivers it
        try:
            with nullcontext() if span is None else self.spans.current(span):
                settled, what, failed = self._publish_settlement(item, now)
        finally:
            if span is not None:
                self.spans.finish(span, what, failed=failed)
        return settled

    def _publish_settlement(self, item: Item, now: dt.datetime) -> tuple[bool, str, bool]:
        """(whether it may be acknowledged, its outcome, whether that is a failure rather than an answer)."""
        try:
            settlement = outcome.decide(item, self.settings, now, self.dlq)
            if settlement.reply is not None:
                envelope = item.envelope
                self._replies.add(envelope.reply_to, settlement.reply,
                                  correlation_id=envelope.reply_correlation_id, headers=item.outgoing_trace)
            if settlement.retry is not None:
                self._retry(item, settlement)
            if settlement.dead_letter:
                self._dead_letter(item, settlement, now)
            self._log(item, settlement)
            self._count(item, settlement.outcome)
            return True, settlement.outcome, settlement.dead_letter or settlement.retry is not None
        except (UnroutableError, NackError) as exc:
            self.log.error("could not publish what settles a message; requeueing it", message_id=item.message_id,
                           error=type(exc).__name__)
            self._redeclare = True
            self._channel.basic_nack(delivery_tag=item.delivery.tag, requeue=True)
            self._count(item, "REQUEUED")
            return False, "REQUEUED", True
        except AMQPError:
            raise  # the connection or channel is gone: the broker redelivers the batch
        except Exception as exc:  # noqa: BLE001 - this message alone: the broker dead-letters it
            self.log.error(f"could not settle a message; rejected to {self.dlq} by the broker",
                           message_id=item.message_id, exc_info=exc)
            self._channel.basic_reject(delivery_tag=item.delivery.tag, requeue=False)
            self._count(item, "REJECTED")
            self.metrics.dead_lettered(self.dlq, "REJECTED")
            return False, "REJECTED", True

    def _count(self, item: Item, outcome: str) -> None:
        self.metrics.settled(self.queue, item.envelope.routing_key, outcome, item.ms / 1000)

    def _retry(self, item: Item, settlement: outcome.Settlement) -> None:
        envelope, decision, (code, error) = item.envelope, settlement.retry, settlement.error
        headers = retry.retry_headers(envelope.trace, envelope.message_id, item.past, envelope.routing_key,
                                      user_id=envelope.user_id, code=code, error=error, signer=self.signer)
        queue = retry.retry_queue(self.queue, decision.delay_s or 0)
        self._publisher.copy(queue, item.delivery.body, copy_properties(envelope, headers, user_id=self.own_user))

    def _dead_letter(self, item: Item, settlement: outcome.Settlement, now: dt.datetime) -> None:
        envelope, (code, error) = item.envelope, settlement.error
        headers = retry.dead_letter_headers(envelope.trace, envelope.message_id, item.past, envelope.routing_key,
                                            user_id=envelope.user_id, code=code, error=error, now=now,
                                            signer=self.signer)
        properties = copy_properties(envelope, headers)
        raw_id = item.delivery.properties.message_id
        if envelope.message_id is None and isinstance(raw_id, (str, bytes)):
            properties.message_id = raw_id  # §8: a dead letter keeps its message_id, even one the service refused
        self._publisher.copy(self.dlq, item.delivery.body, properties)
        self.metrics.dead_lettered(self.dlq, code)

    def _log(self, item: Item, settlement: outcome.Settlement) -> None:
        parsed = item.parsed
        fields: dict[str, Any] = {
            "type": item.envelope.routing_key,
            "certificate_id": pipeline.subject(parsed) if parsed is not None else None,
            "outcome": settlement.outcome,
            "ms": round(item.ms, 2),
            "message_id": item.message_id,
        }
        patient = _patient_of(parsed)
        if patient:
            fields["patient"] = patient_hash(patient)
        if item.past.attempts:
            fields["attempt"] = item.past.attempt
        fields.update(settlement.log)
        if settlement.exc_info is not None:
            fields["exc_info"] = settlement.exc_info
        getattr(self.log, settlement.level)(settlement.event, **fields)


def _patient_of(parsed: pipeline.Parsed | None) -> str | None:
    if parsed is None:
        return None
    message = parsed.message
    fields = type(message).model_fields  # not getattr(..., None): a missing attribute costs pydantic an exception
    pid = message.patient_id if "patient_id" in fields else None
    if pid is None and "certificate" in fields and message.certificate is not None:
        pid = message.certificate.patient_id
    return pid


def consumer_count(queue: str, settings: Any) -> int:
    return max(1, int(getattr(settings, "parallel_consumers", 1))) if queue in ORDER_FREE_QUEUES else 1


def make_consumers(settings: Any, engine: Any, *, relay: Any = None, queues: Sequence[str] | None = None,
                   declare: Callable[[Any], Any] | None = None, metrics: LoopMetrics = NO_METRICS,
                   tracer: Any = None) -> list[Consumer]:
    """The consumer threads (not started) for `queues` (default: every consumed queue)."""
    return [Consumer(q, settings, engine, relay=relay, declare=declare, index=i, metrics=metrics, tracer=tracer)
            for q in (queues or CONSUMED_QUEUES) for i in range(consumer_count(q, settings))]


__all__ = ["Backoff", "Consumer", "consumer_count", "make_consumers", "policy_from"]
