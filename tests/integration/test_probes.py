"""`/readyz` as the probes compute it, against real databases: a database is ready only at the code's head
revision, and a relay leads only if it holds the outbox lock in the service's own database."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from service.app import Service
from service.probes import Probes
from service.settings import Settings
from storage import migrate
from storage import outbox as store
from storage.engine import make_engine

try:
    from tests.databases import FreshDatabase
except ImportError:  # tests/ itself on sys.path
    from databases import FreshDatabase

pytestmark = pytest.mark.integration


@contextmanager
def probes_for(url: str) -> Iterator[Probes]:
    probes = Probes(Service(Settings(database_url=url, metrics_port=0)), port=0)
    try:
        yield probes
    finally:
        probes.stop()


@pytest.fixture
def fresh(database_url: str) -> Iterator[str]:
    with FreshDatabase(database_url, "probes") as url:
        yield url


def test_a_database_is_ready_only_once_migrated_to_the_codes_head(fresh):
    with probes_for(fresh) as probes:
        ready, body = probes.ready()
        assert not ready and body["checks"]["database"] == f"not migrated: at revision (none), the code needs {probes.head}"
        migrate.upgrade(fresh, "0001")
        assert probes.ready()[1]["checks"]["database"] == f"not migrated: at revision 0001, the code needs {probes.head}"
        migrate.upgrade(fresh)
        _, body = probes.ready()
        assert body["checks"]["database"] == "ok" and "database" not in body["not_ready"]
        assert body["checks"]["consumers"] == "not started yet"  # a service that has not started is not ready


def test_a_relay_leads_only_with_the_outbox_lock_in_the_services_own_database(fresh, database_url):
    migrate.upgrade(fresh)
    with FreshDatabase(database_url, "elsewhere") as elsewhere:
        with probes_for(fresh) as probes:
            assert probes.ready()[1]["checks"]["relay_leader"] == "no relay holds the outbox lock"
            other, own = make_engine(elsewhere, pool_size=1), make_engine(fresh, pool_size=1)
            try:
                with other.connect() as conn:
                    assert store.try_lead(conn)  # another service's relay, on the same server
                    assert probes.ready()[1]["checks"]["relay_leader"] == "no relay holds the outbox lock"
                with own.connect() as conn:
                    assert store.try_lead(conn)
                    assert probes.ready()[1]["checks"]["relay_leader"] == "ok"
                    store.release_lead(conn)
                assert probes.ready()[1]["checks"]["relay_leader"] == "no relay holds the outbox lock"
            finally:
                other.dispose()
                own.dispose()
