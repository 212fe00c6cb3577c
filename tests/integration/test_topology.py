"""The service's broker topology (CONTRACT §1) against a real RabbitMQ, in this run's own vhost."""
from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pika
import pytest

from consumers.retry import retry_queue
from contracts.topology import (ACCESS_LOG_QUEUE, ACCESS_LOGGED, COMMANDS_EXCHANGE, EVENTS_EXCHANGE, SERVICE_QUEUES,
                                UNROUTED, dlq, recipient_queue)
from service import topology
from service.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(amqp_url):
    return Settings(amqp_url=amqp_url, retry_delays_s=[1, 2, 5])


@pytest.fixture
def channel(amqp_url):
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def _passive(channel, name):
    return channel.queue_declare(name, passive=True)


def test_declaring_twice_is_idempotent(amqp_url, settings, channel):
    first = topology.declare_with(amqp_url, settings)
    second = topology.declare(channel, settings)  # the same on a channel that stays usable
    assert first.as_dict() == second.as_dict()
    channel.exchange_declare(COMMANDS_EXCHANGE, exchange_type="topic", passive=True)
    channel.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", passive=True)
    names = {q["name"] for q in second.as_dict()["queues"]}
    for queue in SERVICE_QUEUES:
        assert {queue, dlq(queue), retry_queue(queue, 1), retry_queue(queue, 2), retry_queue(queue, 5)} <= names
        _passive(channel, queue)
        _passive(channel, dlq(queue))
    for recipient in settings.recipients:
        _passive(channel, recipient_queue(recipient.id))


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl (local broker)")
def test_queue_types_and_retry_arguments(amqp_url, settings):
    topology.declare_with(amqp_url, settings)
    vhost = pika.URLParameters(amqp_url).virtual_host
    out = subprocess.run(["rabbitmqctl", "-q", "--formatter", "json", "list_queues", "-p", vhost,
                          "name", "type", "durable", "arguments"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    queues = {q["name"]: q for q in json.loads(out)}
    for queue in SERVICE_QUEUES:
        assert queues[queue]["type"] == "quorum" and queues[queue]["durable"]
        assert queues[dlq(queue)]["type"] == "quorum" and queues[dlq(queue)]["durable"]
        assert _arguments(queues[queue])["x-delivery-limit"] == topology.DELIVERY_LIMIT
        assert _arguments(queues[queue])["x-dead-letter-routing-key"] == dlq(queue)
        delayed = queues[retry_queue(queue, 5)]
        assert delayed["type"] == "quorum" and delayed["durable"]
        arguments = _arguments(delayed)
        assert arguments["x-message-ttl"] == 5000
        assert arguments["x-dead-letter-exchange"] == ""
        assert arguments["x-dead-letter-routing-key"] == queue
        assert arguments["x-dead-letter-strategy"] == "at-least-once"
    for recipient in settings.recipients:
        assert queues[recipient_queue(recipient.id)]["type"] == "quorum"
        assert queues[recipient_queue(recipient.id)]["durable"]
    assert queues[UNROUTED]["type"] == "quorum" and queues[dlq(UNROUTED)]["type"] == "quorum"
    assert queues[ACCESS_LOG_QUEUE]["type"] == "quorum" and queues[ACCESS_LOG_QUEUE]["durable"]


def _arguments(queue: dict) -> dict:
    given = queue["arguments"]
    return {a[0]: a[2] for a in given} if isinstance(given, list) else given


def test_an_expired_retry_copy_returns_to_its_queue(amqp_url, settings, channel):
    """The delay queues are wired so that a copy comes back to the service queue after its TTL."""
    topology.declare(channel, settings)
    queue = "intyg.consent"
    channel.queue_purge(queue)
    marker = f"retry-wiring-{uuid.uuid4()}"
    channel.confirm_delivery()
    channel.basic_publish("", retry_queue(queue, 1), b"{}", pika.BasicProperties(message_id=marker),
                          mandatory=True)
    for method, properties, _body in channel.consume(queue, inactivity_timeout=5):
        assert method is not None, "the copy did not come back within 5 s"
        channel.basic_ack(method.delivery_tag)
        if properties.message_id == marker:
            assert method.exchange == "" and method.routing_key == queue
            break
    channel.cancel()


def test_commands_are_routed_to_their_queue_and_recipient_deliveries_to_the_recipient(amqp_url, settings, channel):
    topology.declare(channel, settings)
    channel.confirm_delivery()
    for queue, types in SERVICE_QUEUES.items():
        channel.queue_purge(queue)
        for message_type in types:
            channel.basic_publish(COMMANDS_EXCHANGE, message_type, b"{}", mandatory=True)
        assert _passive(channel, queue).method.message_count == len(types)
        channel.queue_purge(queue)
    recipient = recipient_queue("FKASSA")
    channel.queue_purge(recipient)
    channel.basic_publish(EVENTS_EXCHANGE, "recipient.FKASSA.certificate.sent", b"{}", mandatory=True)
    channel.basic_publish(EVENTS_EXCHANGE, "recipient.TRANSP.certificate.sent", b"{}", mandatory=True)
    channel.basic_publish(EVENTS_EXCHANGE, "certificate.registered", b"{}")  # broadcast: not for recipients
    assert _passive(channel, recipient).method.message_count == 1
    channel.queue_purge(recipient)
    channel.queue_purge(recipient_queue("TRANSP"))


def test_an_unknown_message_type_reaches_the_unrouted_queue(amqp_url, settings, channel):
    """§1: the alternate exchange of `intyg.commands` catches what no binding routes."""
    topology.declare(channel, settings)
    channel.confirm_delivery()
    channel.queue_purge(UNROUTED)
    channel.basic_publish(COMMANDS_EXCHANGE, "certificate.hack", b"{}", mandatory=True)
    assert _passive(channel, UNROUTED).method.message_count == 1
    method, _properties, _body = channel.basic_get(UNROUTED, auto_ack=True)
    assert method.routing_key == "certificate.hack"


def test_the_access_log_queue_gets_access_entries_and_no_broadcast(amqp_url, settings, channel):
    """§9: `intyg.access-log` is bound to `access.logged` alone; certificate events and deliveries never reach it,
    and the entries (which name the patient) reach no broadcast subscriber of `certificate.#`."""
    topology.declare(channel, settings)
    channel.confirm_delivery()
    channel.queue_purge(ACCESS_LOG_QUEUE)
    broadcast = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(broadcast, EVENTS_EXCHANGE, routing_key="certificate.#")
    channel.basic_publish(EVENTS_EXCHANGE, ACCESS_LOGGED, b"{}", mandatory=True)
    for key in ("certificate.registered", "certificate.purged", "recipient.FKASSA.certificate.sent"):
        channel.basic_publish(EVENTS_EXCHANGE, key, b"{}")
    assert _passive(channel, ACCESS_LOG_QUEUE).method.message_count == 1
    assert _passive(channel, broadcast).method.message_count == 2
    channel.queue_purge(ACCESS_LOG_QUEUE)
    channel.queue_purge(recipient_queue("FKASSA"))


def test_a_conflicting_queue_is_named(amqp_url, channel):
    """An existing queue with other arguments is reported, not silently changed."""
    other = Settings(amqp_url=amqp_url, retry_delays_s=[7])
    vhost_queue = retry_queue("intyg.status", 7)
    channel.queue_declare(vhost_queue, durable=True)  # no TTL: conflicts with what the service declares
    try:
        with pytest.raises(topology.TopologyConflict, match=vhost_queue.replace(".", r"\.")):
            topology.declare_with(amqp_url, other)
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        connection.channel().queue_delete(vhost_queue)
        connection.close()

