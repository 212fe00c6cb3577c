"""How broker and database URLs are read (issue 7): a list of broker nodes, shuffled per connection and taken in
turn by the relay; libpq's multi-host database URL; a read-only transaction (a failover under the connection) is
worth retrying; passwords never shown."""
from __future__ import annotations

import psycopg
import pytest

from publishers import amqp
from service.settings import Settings
from storage.engine import make_engine, to_sqlalchemy_url
from storage.errors import is_transient

NODES = "amqp://u:pw@h1:5672/v,amqps://u:pw@h2/v, amqp://u:pw@h3:5673/v"


def test_every_node_of_the_list_is_tried_and_the_order_is_shuffled_per_connection():
    broker = amqp.Broker(NODES)
    orders = {tuple(p.host for p in broker.parameters()) for _ in range(50)}
    assert all(sorted(order) == ["h1", "h2", "h3"] for order in orders)
    assert len(orders) > 1


def test_an_amqps_node_is_verified_against_its_host_name_and_the_default_tls_port():
    amqps = next(p for p in amqp.Broker(NODES).parameters() if p.host == "h2")
    assert amqps.port == 5671 and amqps.ssl_options.server_hostname == "h2"
    assert amqps.ssl_options.context.check_hostname is True


def test_the_relay_takes_the_nodes_in_turn():
    seen = [amqp.next_node(NODES, "relay-turns").host for _ in range(6)]
    assert sorted(seen[:3]) == ["h1", "h2", "h3"] and seen[3:] == seen[:3]


@pytest.mark.parametrize("url, says", [
    ("http://u:pw@h/v", "scheme must be amqp or amqps"),
    ("amqp://u:pw@/v", "no host"),
    ("amqp://u:pw@h:abc/v", "Port could not be cast"),
    ("amqp://u:pw@h/v?nonsense=1", "Unknown URL parameter"),
    ("", "AMQP_URL is empty"),
])
def test_a_malformed_entry_is_a_clear_error_without_the_password(url, says):
    with pytest.raises(amqp.BrokerUrlError, match=says) as wrong:
        amqp.split_nodes(f"amqp://u:pw@ok/v,{url}" if url else url)
    assert ":pw@" not in str(wrong.value)


def test_config_hides_the_password_of_every_node():
    shown = Settings(amqp_url=NODES).redacted()["amqp_url"]
    assert ":pw@" not in shown and shown.count(":***@") == 3


def test_libpq_multi_host_url_reaches_libpq_as_host_and_port_lists():
    url = "postgresql://app:pw@db1:5432,db2:5433/intyg?target_session_attrs=read-write&sslmode=verify-full"
    engine = make_engine(url)
    args = engine.dialect.create_connect_args(engine.url)[1]
    assert (args["host"], args["port"], args["dbname"]) == ("db1,db2", "5432,5433", "intyg")
    assert args["target_session_attrs"] == "read-write" and args["sslmode"] == "verify-full"
    assert to_sqlalchemy_url("postgresql://app@db1/intyg").host == "db1"  # one host: unchanged


def test_a_read_only_transaction_is_transient_because_a_failover_happened_under_the_connection():
    class ReadOnly(psycopg.errors.ReadOnlySqlTransaction):
        pass
    assert psycopg.errors.ReadOnlySqlTransaction.sqlstate == "25006"
    assert is_transient(ReadOnly("cannot execute INSERT in a read-only transaction"))
