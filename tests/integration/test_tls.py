"""TLS with the peer verified (issue 7): a RabbitMQ node and a PostgreSQL server of the test's own, with
certificates from a CA made in the test. The service connects over amqps:// with the CA and a client certificate
from its settings, and over `sslmode=verify-full`; a server it cannot verify is refused with an error that names the
node and never the password."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from publishers import amqp
from service import topology
from service.settings import Settings
from storage.engine import make_engine

try:
    from tests.cluster import PostgresPair
except ImportError:  # tests/ itself on sys.path
    from cluster import PostgresPair

pytestmark = pytest.mark.integration


def _settings(url: str, pki: dict[str, Path], **over: object) -> Settings:
    files = {"amqp_ca_file": str(pki["ca"]), "amqp_cert_file": str(pki["client_cert"]),
             "amqp_key_file": str(pki["client_key"]), **over}
    return Settings(amqp_url=url, **files)


def test_amqps_with_the_ca_and_a_client_certificate_from_settings_declares_the_topology(tls_node, pki):
    node = tls_node.nodes[0]
    settings = _settings(node.tls_url(), pki)
    summary = topology.declare_with(settings.amqp_url, settings)
    assert summary.queues
    connection = amqp.connect(amqp.Broker.from_settings(settings), "tls test")
    try:
        assert connection.is_open
    finally:
        connection.close()


def test_a_broker_certificate_of_another_ca_is_refused_naming_the_node(tls_node, pki):
    node = tls_node.nodes[0]
    settings = _settings(node.tls_url().replace("guest:guest", "guest:s3cret"), pki,
                         amqp_ca_file=str(pki["stranger_ca"]))
    with pytest.raises(amqp.BrokerUnreachable) as refused:
        amqp.connect(amqp.Broker.from_settings(settings))
    said = str(refused.value)
    assert f"amqps://localhost:{node.tls_port}" in said and "CERTIFICATE_VERIFY_FAILED" in said
    assert "s3cret" not in said


def test_a_broker_reached_under_a_name_its_certificate_does_not_carry_is_refused(tls_node, pki):
    node = tls_node.nodes[0]
    settings = _settings(node.tls_url(host="127.0.0.1"), pki)  # the certificate names localhost only
    with pytest.raises(amqp.BrokerUnreachable) as refused:
        amqp.connect(amqp.Broker.from_settings(settings))
    assert "127.0.0.1" in str(refused.value) and "CERTIFICATE_VERIFY_FAILED" in str(refused.value)


def test_without_the_client_certificate_the_handshake_fails_with_a_clear_error(tls_node, pki):
    node = tls_node.nodes[0]
    settings = _settings(node.tls_url(), pki, amqp_cert_file=None, amqp_key_file=None)
    with pytest.raises(amqp.BrokerUnreachable) as refused:
        amqp.connect(amqp.Broker.from_settings(settings))
    assert f"amqps://localhost:{node.tls_port}" in str(refused.value)


@pytest.fixture(scope="module")
def tls_postgres(pki) -> Iterator[PostgresPair]:
    with PostgresPair(standby=False, ssl=(pki["ca"], pki["server_cert"], pki["server_key"])) as pg:
        yield pg


def test_sslmode_verify_full_works_for_the_service_engine_and_the_listener(tls_postgres, pki):
    port = tls_postgres.primary.port
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={pki['ca']}"
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).scalar() is True
        # the NOTIFY listener connects with the dialect's translation of the same URL
        with psycopg.connect(autocommit=True, **engine.dialect.create_connect_args(engine.url)[1]) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    finally:
        engine.dispose()


def test_sslmode_verify_full_refuses_a_server_of_another_ca(tls_postgres, pki):
    port = tls_postgres.primary.port
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={pki['stranger_ca']}"
    engine = make_engine(url)
    try:
        with pytest.raises(Exception, match="certificate verify failed"):
            with engine.connect():
                pass
    finally:
        engine.dispose()
