"""The service's HTTP endpoints as an operator's Prometheus and orchestrator see them: `/metrics` scraped over HTTP
while messages flow (parsed with prometheus_client's parser), `/readyz` and `/healthz` through a database that is
not there yet, comes, and goes, and a port that is already taken."""
from __future__ import annotations

import signal
import socket
import subprocess
from importlib import metadata

import pytest

try:
    from tests.cluster import PostgresPair, free_port
    from tests.e2e.common import certificate, check_reply
    from tests.e2e.harness import REPO, cli, new_id, new_patient, probe, sample, scrape, service_env, wait_for
except ImportError:  # tests/ itself on sys.path
    from cluster import PostgresPair, free_port
    from e2e.common import certificate, check_reply
    from e2e.harness import REPO, cli, new_id, new_patient, probe, sample, scrape, service_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REG = "intyg.registration"
FAST_RECONNECT = {"RECONNECT_MAX_S": "1", "RELAY_POLL_S": "0.05"}
OUTBOX_BACKLOG = "SELECT count(*) FROM outbox WHERE published_at IS NULL"


def consumed(metrics, queue: str, kind: str, outcome: str) -> float:
    return sample(metrics, "messaging_client_consumed_messages_total", messaging_destination_name=queue,
                  messaging_rabbitmq_destination_routing_key=kind, outcome=outcome)


def health_check(endpoint: str, port: int) -> int:
    """The exit code of `intygstjanst probe ENDPOINT`, as a container health check runs it."""
    return subprocess.run(cli("probe", endpoint), env=service_env(METRICS_PORT=port), capture_output=True,
                          timeout=30).returncode


def test_metrics_count_messages_by_queue_type_and_outcome_and_the_outbox_gauges_follow_the_relay(launch, wire, stack):
    consumer_port, relay_port = free_port(), free_port()
    consumers = launch("--no-relay", metrics_port=consumer_port)

    # consumers without any relay: alive, not ready, and the JSON says why
    assert probe(consumer_port, "/healthz") == (200, {"alive": True})
    status, body = wait_for(lambda: (lambda r: r if r[1]["checks"]["consumers"] == "ok" else None)(
        probe(consumer_port, "/readyz")), 30, "consumers consuming")
    assert status == 503 and body["not_ready"] == ["relay_leader"]
    assert body["checks"]["database"] == "ok"

    registrations = [wire.send("certificate.register", {"certificate": certificate(new_id(), new_patient())})
                     for _ in range(5)]
    wire.send("certificate.register", {"certificate": certificate(new_id(), new_patient())},
              message_id=registrations[0])  # a duplicate of the first
    wire.send("certificate.register", b"{not json")  # invalid: answered and dead-lettered
    wire.send("certificate.nonsense", {"x": 1})  # unknown type: reaches intyg.unrouted
    query = wire.send("consent.get", {"patient_id": new_patient()})
    check_reply(wire, query, "OK")  # queries are answered directly, without the relay

    def settled():
        m = scrape(consumer_port)
        return m if consumed(m, REG, "certificate.register", "OK") == 5 \
            and consumed(m, REG, "certificate.register", "DUPLICATE") == 1 \
            and consumed(m, REG, "certificate.register", "INVALID_MESSAGE") == 1 \
            and consumed(m, "intyg.unrouted", "unknown", "INVALID_MESSAGE") == 1 else None

    metrics = wait_for(settled, 20, "every message counted")
    assert consumed(metrics, "intyg.query", "consent.get", "OK") == 1
    assert sample(metrics, "intyg_dead_letters_total", messaging_destination_name="intyg.registration.dlq",
                  error_type="INVALID_MESSAGE") == 1
    assert sample(metrics, "intyg_dead_letters_total", messaging_destination_name="intyg.unrouted.dlq",
                  error_type="INVALID_MESSAGE") == 1
    # one duration per handled message of the type; every delivery of the queue in some batch
    assert sample(metrics, "messaging_process_duration_seconds_count", messaging_destination_name=REG,
                  messaging_rabbitmq_destination_routing_key="certificate.register") == 7
    assert sample(metrics, "intyg_consumer_batch_size_sum", messaging_destination_name=REG) == 7
    assert sample(metrics, "intyg_consumer_consuming", messaging_destination_name=REG, consumer="0") == 1
    assert not any(name.startswith("intyg_outbox_relay") for name, _ in metrics)  # no relay in this process
    assert sample(metrics, "intyg_build_info", version=metadata.version("intygstjanst"), contract_version="1.1",
                  messaging_system="rabbitmq") == 1
    # no certificate id, message id or patient ever becomes a label
    label_values = {value for _, labels in metrics for _, value in labels}
    assert not label_values & set(registrations)

    # the events wait in the outbox (the replies went out from the consumer): the backlog gauge shows them and
    # their age grows
    backlog = stack.db.scalar(OUTBOX_BACKLOG)
    assert backlog >= 5
    metrics = wait_for(lambda: (lambda m: m if sample(m, "intyg_outbox_unpublished_messages") == backlog else None)(
        scrape(consumer_port)), 20, f"the backlog gauge at {backlog}")
    assert sample(metrics, "intyg_outbox_oldest_unpublished_age_seconds") > 0
    assert sample(metrics, "intyg_database_up") == 1

    # a relay of its own: it leads, publishes the backlog, and both processes become ready
    launch("--relay-only", metrics_port=relay_port)
    for message_id in registrations:
        check_reply(wire, message_id, "OK")
    relay = wait_for(lambda: (lambda m: m if sample(m, "intyg_outbox_unpublished_messages") == 0
                              and sample(m, "intyg_outbox_relay_published_total") >= backlog else None)(
        scrape(relay_port)), 30, "the relay's gauges at an empty outbox")
    assert sample(relay, "intyg_outbox_relay_leader") == 1
    assert sample(relay, "intyg_outbox_oldest_unpublished_age_seconds") == 0
    assert sample(relay, "intyg_outbox_relay_nacks_total") == 0
    assert not any(name.startswith("messaging_client_consumed") or name == "intyg_consumer_consuming"
                   for name, _ in relay)  # no consumers in the relay's process
    assert probe(relay_port, "/readyz")[0] == 200
    status, body = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(probe(consumer_port, "/readyz")), 20,
                            "the consumers ready once a relay leads")
    assert body == {"ready": True, "not_ready": [],
                    "checks": {"database": "ok", "consumers": "ok", "relay_leader": "ok"}}
    assert consumers.running


def test_readyz_follows_the_database_before_migration_while_it_runs_and_once_it_stops(launch, wire, tmp_path):
    port = free_port()
    with PostgresPair(standby=False) as pg:
        server = pg.primary
        server.stop()
        service = launch(ready=False, database_url=server.url(), metrics_port=port)

        # not there yet: the service waits to migrate; alive, not ready, and says so
        status, body = wait_for(lambda: probe(port, "/readyz"), 30, "the probes answering")
        assert status == 503 and body["checks"]["database"].startswith("unreachable")
        assert "database" in body["not_ready"] and probe(port, "/healthz")[0] == 200
        assert health_check("readyz", port) == 1 and health_check("healthz", port) == 0

        server.start()
        service.wait_ready(60)
        status, body = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(probe(port, "/readyz")), 30,
                                "ready once migrated")
        assert body["checks"] == {"database": "ok", "consumers": "ok", "relay_leader": "ok"}
        check_reply(wire, wire.send("consent.get", {"patient_id": new_patient()}), "OK")
        assert health_check("readyz", port) == 0

        server.stop()
        status, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(probe(port, "/readyz")), 30,
                                "not ready without the database")
        assert body["checks"]["database"].startswith("unreachable") and "database" in body["not_ready"]
        assert probe(port, "/healthz") == (200, {"alive": True})  # restarting would not bring the database back
        wait_for(lambda: sample(scrape(port), "intyg_database_up") == 0, 20, "the database gauge down")

        server.start()
        wait_for(lambda: probe(port, "/readyz")[0] == 200, 60, "ready again once the database is back")
        service.terminate()
        assert service.returncode == 0


def test_a_metrics_port_in_use_is_logged_once_and_the_service_serves_on(launch, wire):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = launch(metrics_port=port)
        check_reply(wire, wire.send("consent.get", {"patient_id": new_patient()}), "OK")
    off = [line for line in service.log_lines() if line.get("event", "").startswith("metrics and health endpoints off")]
    assert len(off) == 1 and off[0]["port"] == port and off[0]["level"] == "warning"


def test_scripts_run_migrates_and_serves_with_the_services_it_is_given(stack, wire, tmp_path):
    port = free_port()
    env = service_env(AMQP_URL=stack.amqp_url, DATABASE_URL=stack.database_url, METRICS_PORT=port, SKIP_INSTALL="1",
                      **FAST_RECONNECT)
    with open(tmp_path / "run.log", "wb") as log:
        run = subprocess.Popen(["bash", str(REPO / "scripts" / "run")], env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: probe(port, "/readyz")[0] == 200, 90, "scripts/run ready")
            check_reply(wire, wire.send("consent.get", {"patient_id": new_patient()}), "OK")
        finally:
            run.send_signal(signal.SIGTERM)
            code = run.wait(60)
    output = (tmp_path / "run.log").read_text()
    assert code == 0, output
    assert "DATABASE_URL from environment" in output and "database migrated from (empty) to" in output
