"""The per-run test services are real, fresh and isolated."""

from __future__ import annotations

import pika
import psycopg
import pytest
from pika.exceptions import ChannelClosedByBroker

pytestmark = pytest.mark.integration


def test_database_is_this_runs_own_and_writable(database_url):
    """Created empty for this run (tests/services.py); other tests of the run migrate it, so no emptiness check."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        assert name != "postgres"
        assert name.startswith("intyg_test_")
        conn.execute("CREATE TEMPORARY TABLE probe (id int PRIMARY KEY, note text NOT NULL)")
        conn.execute("INSERT INTO probe VALUES (1, 'intyg')")
        assert conn.execute("SELECT note FROM probe WHERE id = 1").fetchone() == ("intyg",)


def test_vhost_is_isolated_from_default_vhost(amqp_url):
    params = pika.URLParameters(amqp_url)
    assert params.virtual_host != "/"
    assert params.virtual_host.startswith("intyg-test-")

    queue = "intyg.probe"
    with pika.BlockingConnection(params) as conn:
        channel = conn.channel()
        channel.queue_declare(queue, exclusive=True)
        # Still declared (connection open) while we look for it in "/".
        default = pika.URLParameters(amqp_url)
        default.virtual_host = "/"
        with pika.BlockingConnection(default) as other:
            with pytest.raises(ChannelClosedByBroker) as excinfo:
                other.channel().queue_declare(queue, passive=True)
            assert excinfo.value.reply_code == 404
        # ...and it does exist on the test vhost.
        channel.queue_declare(queue, passive=True)


def test_broker_users_get_their_own_login_on_the_test_vhost(amqp_url, broker_users):
    username = broker_users.unique("intyg-probe-user")
    url = broker_users.add(username, "s3cret/:@pw")
    params = pika.URLParameters(url)
    assert params.credentials.username == username
    assert params.virtual_host == pika.URLParameters(amqp_url).virtual_host
    with pika.BlockingConnection(params) as conn:
        conn.channel().queue_declare("", exclusive=True)
