"""Session fixtures for integration tests: a fresh PostgreSQL database and a
fresh RabbitMQ vhost per test run.

Services come from ``DATABASE_URL`` / ``AMQP_URL`` when set, otherwise from
testcontainers (needs a Docker engine). Everything is lazy: nothing is
contacted unless a test requests one of these fixtures.
"""

from __future__ import annotations

import os

import pytest

try:  # tests/ as a package, or `python -m pytest` from the repo root
    from tests import services
except ImportError:  # tests/ on sys.path (rootdir-less conftest import)
    import services


@pytest.fixture(scope="session")
def _postgres_server_url():
    """URL of a PostgreSQL server (any database) where we may CREATE DATABASE."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield services.normalize_postgres_url(url)
        return
    container, url = services.start_postgres_container("postgres:16-alpine")
    try:
        yield url
    finally:
        container.stop()


@pytest.fixture(scope="session")
def database_url(_postgres_server_url) -> str:
    """``postgresql://user[:pw]@host:port/intyg_test_<hex>``: a fresh, empty database for this run."""
    name = f"intyg_test_{services.run_id()}"
    url = services.create_database(_postgres_server_url, name)
    yield url
    services.drop_database(_postgres_server_url, name)


@pytest.fixture(scope="session")
def _rabbitmq_broker():
    """A :class:`services.TestBroker` with a fresh vhost ``intyg-test-<hex>``."""
    vhost = f"intyg-test-{services.run_id()}"
    url = os.environ.get("AMQP_URL")
    container = None
    if url:
        target = services.AmqpTarget.parse(url)
        admins = services.admin_candidates(target)
    else:
        container, target, admins = services.start_rabbitmq_container("rabbitmq:3.13-management")
    try:
        broker = services.create_test_broker(target, vhost, admins)
        try:
            yield broker
        finally:
            broker.close()
    finally:
        if container is not None:
            container.stop()


@pytest.fixture(scope="session")
def amqp_url(_rabbitmq_broker) -> str:
    """``amqp://user:pass@host:port/intyg-test-<hex>``: a fresh vhost for this run."""
    return _rabbitmq_broker.url


class BrokerUsers:
    """Creates extra broker users with full permissions on the test vhost.

    Users are deleted at session end. User names are global to the broker, so
    pick unique ones (see :meth:`unique`) if runs may share a broker.
    """

    def __init__(self, broker: services.TestBroker):
        self._broker = broker
        self.vhost = broker.vhost
        self._suffix = broker.vhost.rsplit("-", 1)[-1]

    def add(self, username: str, password: str) -> str:
        """Create ``username``; return the AMQP URL for that user on the test vhost."""
        return self._broker.add_user(username, password)

    def unique(self, base: str) -> str:
        """``base`` with this run's suffix, e.g. ``"vardgivare"`` -> ``"vardgivare-1a2b3c4d"``."""
        return f"{base}-{self._suffix}"


@pytest.fixture(scope="session")
def broker_users(_rabbitmq_broker) -> BrokerUsers:
    return BrokerUsers(_rabbitmq_broker)


@pytest.fixture
def fresh_vhost(_rabbitmq_broker):
    """The AMQP URL of a vhost of the test's own (deleted afterwards), for tests that need an empty broker."""
    broker = _rabbitmq_broker
    vhost = f"intyg-own-{services.run_id()}"
    broker.admin.add_vhost(vhost)
    try:
        broker.admin.grant_all(vhost, broker.target.user)
        url = broker.target.url(vhost=vhost)
        services.wait_for_vhost(url)
        yield url
    finally:
        broker.admin.delete_vhost(vhost)
