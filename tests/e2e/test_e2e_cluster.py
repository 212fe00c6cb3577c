"""Losing a broker node or the database under load loses nothing (issue 7): a RabbitMQ cluster and PostgreSQL
servers of the test's own (tests/cluster.py) are SIGKILLed while 2 x 500 messages (registrations, then sends to
FKASSA) are in flight. Every request is answered (a repeat is the same reply again), every certificate is
stored once, and every send reaches `recipient.FKASSA` under exactly one event id."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

try:
    from tests import services
    from tests.cluster import PostgresPair, RabbitCluster, RabbitNode
    from tests.e2e.conftest import FAST
    from tests.e2e.harness import Db, ServiceProcess, service_env
    from tests.e2e.load import (Driver, check_answered_once, check_delivered_once, registrations, sends_to_fkassa,
                                under_fault)
except ImportError:  # tests/ itself on sys.path
    import services
    from cluster import PostgresPair, RabbitCluster, RabbitNode
    from e2e.conftest import FAST
    from e2e.harness import Db, ServiceProcess, service_env
    from e2e.load import Driver, check_answered_once, check_delivered_once, registrations, sends_to_fkassa, under_fault

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = 500
REGISTERED = {"OK"}
SENT = {"OK"}
OUTLAST = [1, 2, 4, 8, 16]


@pytest.fixture
def fresh_database(_postgres_server_url) -> Iterator[str]:
    name = f"intyg_cluster_{services.run_id()}"
    url = services.create_database(_postgres_server_url, name)
    yield url
    services.drop_database(_postgres_server_url, name)


def _serve(tmp_path: Path, amqp_url: str, database_url: str) -> ServiceProcess:
    # Retries that outlast the outage (the default test settings give up within a second: UNAVAILABLE).
    env = service_env(AMQP_URL=amqp_url, DATABASE_URL=database_url, **{**FAST, "RETRY_DELAYS_S": OUTLAST})
    return ServiceProcess(env, tmp_path / "service.log").start(timeout=120)


def _run_and_check(service: ServiceProcess, driver: Driver, db_url: str, faults: list[Callable[[], None]]) -> None:
    try:
        registered = registrations(MESSAGES)
        ids = under_fault(driver, registered, faults[0])
        repeats = check_answered_once(driver, ids, REGISTERED)
        sends = sends_to_fkassa(registered)
        send_ids = under_fault(driver, sends, faults[1])
        send_repeats = check_answered_once(driver, send_ids, SENT)
        deliveries = driver.take_all("recipient.FKASSA")
        delivery_repeats = check_delivered_once(deliveries, sends)
        stored = Db(db_url).scalar("select count(*) from certificates")  # libpq reads the multi-host form
        assert stored == MESSAGES
        print(f"{MESSAGES} registrations ({repeats} repeated replies), {MESSAGES} sends ({send_repeats} repeated "
              f"replies), {len(deliveries)} recipient deliveries ({delivery_repeats} repeats of one event)")
        assert service.running, "the service survived"
    except BaseException:
        print(service.log_text()[-20000:])
        raise


# ----------------------------------------------------------------------------------------------------------------
# the broker: a 3-node cluster; the service knows two nodes, the test's client uses the third
# ----------------------------------------------------------------------------------------------------------------


def _node_of(cluster: RabbitCluster, connection_name: str, via: RabbitNode) -> RabbitNode:
    """The node that holds the service connection named `connection_name` (waits for it to exist)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listed = cluster.ctl(via, "list_connections", "-q", "--no-table-headers", "port", "client_properties")
        for line in listed.splitlines():
            port, _, properties = line.partition("\t")
            if connection_name in properties:  # printed as an Erlang term or as JSON, by version
                return cluster.node_of_port(int(port))
        time.sleep(0.5)
    raise AssertionError(f"no connection {connection_name!r} on the cluster")


def test_killing_the_broker_node_the_service_uses_twice_loses_nothing(tmp_path, fresh_database):
    with RabbitCluster(3) as cluster:
        first, second, third = cluster.nodes
        service = _serve(tmp_path, f"{first.url},{second.url}", fresh_database)
        driver = Driver(third.url)
        killed: list[RabbitNode] = []

        def kill_the_node_of(connection_name: str) -> Callable[[], None]:
            def fault() -> None:
                if killed:  # bring the first victim back first: a quorum needs two of the three nodes
                    cluster.start(killed[-1])
                node = _node_of(cluster, connection_name, third)
                cluster.kill(node)
                killed.append(node)
            return fault

        try:
            _run_and_check(service, driver, fresh_database,
                           [kill_the_node_of("intygstjanst intyg.registration #0"),
                            kill_the_node_of("intygstjanst intyg.status #0")])
            assert "reconnecting" in service.log_text()
        finally:
            driver.close()
            service.terminate()


# ----------------------------------------------------------------------------------------------------------------
# the database: a restart, and a failover to a synchronous standby
# ----------------------------------------------------------------------------------------------------------------


def test_a_database_restart_under_load_loses_nothing(tmp_path, fresh_vhost):
    with PostgresPair(standby=False) as pg:
        service = _serve(tmp_path, fresh_vhost, pg.database_url())
        driver = Driver(fresh_vhost)

        def restart() -> None:
            pg.primary.kill()
            time.sleep(2)
            pg.primary.start()

        try:
            _run_and_check(service, driver, pg.database_url(), [restart, restart])
        finally:
            driver.close()
            service.terminate()


def test_promoting_the_synchronous_standby_after_killing_the_primary_loses_nothing(tmp_path, fresh_vhost):
    with PostgresPair(standby=True, synchronous=True) as pg:
        service = _serve(tmp_path, fresh_vhost, pg.database_url())
        driver = Driver(fresh_vhost)

        def fail_over() -> None:
            pg.primary.kill()
            pg.standby.promote()

        try:
            _run_and_check(service, driver, pg.database_url(), [fail_over, lambda: None])
        finally:
            driver.close()
            service.terminate()
