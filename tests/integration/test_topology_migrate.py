"""`intygstjanst topology --migrate` (issue 7): an installation of an older version — classic recipient, service
and delay queues, a commands exchange without its alternate exchange — with messages in every queue is rebuilt to
the current topology, and every message is still there afterwards."""
from __future__ import annotations

import json
import subprocess

import pika
import pytest

from consumers import retry
from contracts.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE, UNROUTED
from service import topology
from service.settings import Settings

try:
    from tests.e2e.harness import REPO, cli, service_env
except ImportError:  # tests/ itself on sys.path
    from e2e.harness import REPO, cli, service_env

pytestmark = pytest.mark.integration

RETRY = "intyg.registration.retry.60000ms"
OLD_QUEUES = {  # name -> (arguments of the older version, bindings, messages put in)
    "intyg.registration": ({"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "intyg.registration.dlq"},
                           [(COMMANDS_EXCHANGE, "certificate.register")], 30),
    RETRY: ({"x-message-ttl": 60000, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "intyg.registration"},
            [], 10),
    "recipient.FKASSA": ({}, [(EVENTS_EXCHANGE, "recipient.FKASSA.#")], 20),
}
# How the messages got there (delay queues receive retry copies straight, by name).
PUBLISHED_TO = {"intyg.registration": (COMMANDS_EXCHANGE, "certificate.register"),
                "recipient.FKASSA": (EVENTS_EXCHANGE, "recipient.FKASSA.certificate.sent")}


def _channel(url: str):
    connection = pika.BlockingConnection(pika.URLParameters(url))
    return connection, connection.channel()


def _install_old_version(url: str) -> dict[str, set[str]]:
    connection, channel = _channel(url)
    channel.exchange_declare(COMMANDS_EXCHANGE, exchange_type="topic", durable=True)
    channel.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", durable=True)
    channel.confirm_delivery()
    sent: dict[str, set[str]] = {}
    for name, (arguments, bindings, count) in OLD_QUEUES.items():
        channel.queue_declare(name, durable=True, arguments=arguments or None)  # classic, as before v1.1
        for exchange, key in bindings:
            channel.queue_bind(name, exchange, routing_key=key)
        sent[name] = set()
        for n in range(count):
            message_id = f"{name}-{n}"
            exchange, key = PUBLISHED_TO.get(name, ("", name))
            channel.basic_publish(exchange, key, json.dumps({"n": n}).encode(), pika.BasicProperties(
                message_id=message_id, delivery_mode=2, headers={"n": n}, reply_to="client-replies",
                user_id="guest" if n % 2 else None))
            sent[name].add(message_id)
    connection.close()
    return sent


def _drain(channel, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    out = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((properties, body))


def test_migrate_rebuilds_an_old_topology_and_keeps_every_message(fresh_vhost):
    sent = _install_old_version(fresh_vhost)
    settings = Settings(amqp_url=fresh_vhost, retry_delays_s=[60])
    with pytest.raises(topology.TopologyConflict):  # what the service says without the migration
        topology.declare_with(fresh_vhost, settings)

    done = subprocess.run(cli("topology", "--migrate"), cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=service_env(AMQP_URL=fresh_vhost, RETRY_DELAYS_S=[60]))
    assert done.returncode == 0, done.stdout + done.stderr
    said = " ".join(done.stdout.split())  # the console wraps long lines
    assert "exchange intyg.commands declared anew" in said
    for name, (_, _, count) in OLD_QUEUES.items():
        assert f"queue {name} declared anew, {count} messages moved back into it" in said

    topology.declare_with(fresh_vhost, settings)  # no conflict left: every argument is the service's
    connection, channel = _channel(fresh_vhost)
    try:
        signer = retry.Signer(settings.signing_key)
        for name, ids in sent.items():
            messages = _drain(channel, name)
            assert {p.message_id for p, _ in messages} == ids, name
            assert all(p.reply_to == "client-replies" for p, _ in messages)
            if name == "intyg.registration":  # back as the service's own retry copies, acting as their sender
                for properties, body in messages:
                    signed = signer.verified(properties.headers, properties.message_id)
                    assert signed is not None and signed.routing_key == "certificate.register"
                    assert signed.user_id == ("guest" if json.loads(body)["n"] % 2 else None)
                    assert properties.user_id == "guest"  # the migrating (the service's) user
            else:
                assert all(p.headers["n"] == json.loads(b)["n"] for p, b in messages)
            with pytest.raises(pika.exceptions.ChannelClosedByBroker):  # the temporary queue is gone
                connection.channel().queue_declare(name + ".migrating", passive=True)
        # the rebuilt bindings and the alternate exchange work
        channel.confirm_delivery()
        channel.basic_publish(COMMANDS_EXCHANGE, "certificate.register", b"{}", mandatory=True)
        channel.basic_publish(COMMANDS_EXCHANGE, "no.such.type", b"{}", mandatory=True)
        channel.basic_publish(EVENTS_EXCHANGE, "recipient.FKASSA.certificate.sent", b"{}", mandatory=True)
        assert [len(_drain(channel, q)) for q in ("intyg.registration", UNROUTED, "recipient.FKASSA")] == [1, 1, 1]
    finally:
        connection.close()


def test_migrating_a_current_topology_changes_nothing(fresh_vhost):
    settings = Settings(amqp_url=fresh_vhost, retry_delays_s=[60])
    topology.declare_with(fresh_vhost, settings)
    done = subprocess.run(cli("topology", "--migrate"), cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=service_env(AMQP_URL=fresh_vhost, RETRY_DELAYS_S=[60]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "declared anew" not in done.stdout
