"""Mechanics behind the session fixtures in ``conftest.py``.

* PostgreSQL: create/drop a throw-away database on a server (psycopg).
* RabbitMQ: create/delete a throw-away vhost and extra users, either with
  ``rabbitmqctl`` (local broker, or ``docker exec`` into a test container) or
  through the management HTTP API (urllib, no extra dependency).

Nothing here touches the network at import time; heavy imports are lazy.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Sequence
from urllib.parse import quote, unquote, urlsplit, urlunsplit


class ServiceSetupError(RuntimeError):
    """A test service could not be prepared; the message says why."""


def run_id() -> str:
    return secrets.token_hex(4)


def redact(url: str) -> str:
    """``url`` with the password replaced by ``***`` (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[1]}"))


def _netloc(user: str | None, password: str | None, host: str, port: int | None) -> str:
    auth = ""
    if user:
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        auth += "@"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{auth}{host}" + (f":{port}" if port else "")


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


def normalize_postgres_url(url: str) -> str:
    """``postgresql+driver://`` / ``postgres://`` -> ``postgresql://``."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("postgresql", "postgres"):
        raise ServiceSetupError(f"not a PostgreSQL URL: {redact(url)}")
    return urlunsplit(parts._replace(scheme="postgresql"))


def with_database(server_url: str, dbname: str) -> str:
    parts = urlsplit(normalize_postgres_url(server_url))
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


def _pg_connect(url: str):
    import psycopg

    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise ServiceSetupError(
            f"cannot connect to PostgreSQL at {redact(url)}: {exc}\n"
            "Set DATABASE_URL to a reachable server (a user allowed to CREATE DATABASE), "
            "or unset it and run with a Docker engine (testcontainers)."
        ) from exc


def create_database(server_url: str, dbname: str) -> str:
    """Create ``dbname`` on the server; return its ``postgresql://`` URL."""
    from psycopg import sql

    server_url = normalize_postgres_url(server_url)
    with _pg_connect(server_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    return with_database(server_url, dbname)


def drop_database(server_url: str, dbname: str) -> None:
    from psycopg import sql

    server_url = normalize_postgres_url(server_url)
    with _pg_connect(server_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


def _start_container(factory: Callable[[], object], what: str, env: str):
    container = None
    try:
        container = factory()
        container.start()
        return container
    except Exception as exc:
        if container is not None:
            try:
                container.stop()
            except Exception:
                pass
        raise ServiceSetupError(
            f"{env} is unset, so the tests tried to start a {what} container with "
            f"testcontainers, which failed: {exc!r}\n"
            f"Set {env} to a running {what}, or run the tests via scripts/test, "
            "which finds/starts local services."
        ) from exc


def start_postgres_container(image: str = "postgres:16-alpine"):
    """Start a testcontainers PostgreSQL; return ``(container, server_url)``."""
    try:  # testcontainers >= 4.15 layout
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        from testcontainers.postgres import PostgresContainer

    container = _start_container(
        lambda: PostgresContainer(image, driver=None), "PostgreSQL", "DATABASE_URL"
    )
    user, password = container.username, container.password
    url = "postgresql://" + _netloc(
        user, password, container.get_container_host_ip(), int(container.get_exposed_port(5432))
    ) + "/" + container.dbname
    return container, url


# --------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AmqpTarget:
    user: str
    password: str
    host: str
    port: int
    vhost: str
    scheme: str = "amqp"
    query: str = ""

    @classmethod
    def parse(cls, url: str) -> "AmqpTarget":
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ServiceSetupError(f"not an AMQP URL: {redact(url)}")
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return cls(
            user=unquote(parts.username) if parts.username else "guest",
            password=unquote(parts.password) if parts.password is not None else "guest",
            host=parts.hostname or "localhost",
            port=parts.port or (5671 if parts.scheme == "amqps" else 5672),
            vhost=unquote(path) if path else "/",
            scheme=parts.scheme,
            query=parts.query,
        )

    def url(self, vhost: str | None = None, user: str | None = None, password: str | None = None) -> str:
        user = self.user if user is None else user
        password = self.password if password is None else password
        vhost = self.vhost if vhost is None else vhost
        return urlunsplit(
            (
                self.scheme,
                _netloc(user, password, self.host, self.port),
                "/" + quote(vhost, safe=""),
                self.query,
                "",
            )
        )


class RabbitAdmin:
    """Minimal broker administration: vhosts, users, permissions."""

    name = "?"

    def add_vhost(self, vhost: str) -> None: ...
    def delete_vhost(self, vhost: str) -> None: ...
    def add_user(self, user: str, password: str) -> None: ...
    def delete_user(self, user: str) -> None: ...
    def grant_all(self, vhost: str, user: str) -> None: ...


class CtlAdmin(RabbitAdmin):
    """``rabbitmqctl`` through a runner: locally, or inside a container."""

    def __init__(self, runner: Callable[[Sequence[str]], tuple[int, str]], name: str):
        self._run = runner
        self.name = name

    def _ctl(self, *args: str) -> None:
        code, output = self._run(["rabbitmqctl", "-q", *args])
        if code != 0:
            raise ServiceSetupError(
                f"`rabbitmqctl {' '.join(args[:2])} ...` failed via {self.name} "
                f"(exit {code}): {output.strip()}"
            )

    def add_vhost(self, vhost: str) -> None:
        self._ctl("add_vhost", vhost)

    def delete_vhost(self, vhost: str) -> None:
        self._ctl("delete_vhost", vhost)

    def add_user(self, user: str, password: str) -> None:
        self._ctl("add_user", "--", user, password)

    def delete_user(self, user: str) -> None:
        self._ctl("delete_user", "--", user)

    def grant_all(self, vhost: str, user: str) -> None:
        self._ctl("set_permissions", "-p", vhost, "--", user, ".*", ".*", ".*")


def local_ctl_runner(cmd: Sequence[str]) -> tuple[int, str]:
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return proc.returncode, proc.stdout + proc.stderr


def container_ctl_runner(container) -> Callable[[Sequence[str]], tuple[int, str]]:
    def run(cmd: Sequence[str]) -> tuple[int, str]:
        result = container.exec(list(cmd))
        output = result.output
        if isinstance(output, bytes):
            output = output.decode("utf-8", "replace")
        return result.exit_code, output or ""

    return run


class HttpAdmin(RabbitAdmin):
    """RabbitMQ management HTTP API (``/api/...``)."""

    def __init__(self, base_url: str, user: str, password: str):
        self.base_url = base_url.rstrip("/")
        self.name = f"management API {self.base_url}"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"

    def _request(self, method: str, path: str, body: dict | None = None, ok404: bool = False) -> None:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Authorization", self._auth)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            if ok404 and exc.code == 404:
                return
            detail = exc.read().decode("utf-8", "replace")
            raise ServiceSetupError(f"{method} {self.base_url}{path} -> HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceSetupError(f"{method} {self.base_url}{path} failed: {exc}") from exc

    @staticmethod
    def _q(name: str) -> str:
        return quote(name, safe="")

    def answers(self) -> bool:
        try:
            self._request("GET", "/api/overview")
            return True
        except ServiceSetupError:
            return False

    def add_vhost(self, vhost: str) -> None:
        self._request("PUT", f"/api/vhosts/{self._q(vhost)}", {})

    def delete_vhost(self, vhost: str) -> None:
        self._request("DELETE", f"/api/vhosts/{self._q(vhost)}", ok404=True)

    def add_user(self, user: str, password: str) -> None:
        self._request("PUT", f"/api/users/{self._q(user)}", {"password": password, "tags": ""})

    def delete_user(self, user: str) -> None:
        self._request("DELETE", f"/api/users/{self._q(user)}", ok404=True)

    def grant_all(self, vhost: str, user: str) -> None:
        self._request(
            "PUT",
            f"/api/permissions/{self._q(vhost)}/{self._q(user)}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )


_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def is_local_host(host: str) -> bool:
    if host in _LOCAL_HOSTS:
        return True
    try:
        return host in {socket.gethostname(), socket.getfqdn()}
    except OSError:
        return False


def admin_candidates(target: AmqpTarget) -> list[RabbitAdmin]:
    """Ways to administer the broker of ``target``, best first."""
    candidates: list[RabbitAdmin] = []
    if shutil.which("rabbitmqctl") and is_local_host(target.host):
        candidates.append(CtlAdmin(local_ctl_runner, "local rabbitmqctl"))
    port = int(os.environ.get("RABBITMQ_MANAGEMENT_PORT", "15672"))
    scheme = "https" if target.scheme == "amqps" else "http"
    host = f"[{target.host}]" if ":" in target.host else target.host
    candidates.append(HttpAdmin(f"{scheme}://{host}:{port}", target.user, target.password))
    return candidates


@dataclass
class TestBroker:
    """A broker plus a working admin channel, with one throw-away vhost."""

    __test__ = False  # not a pytest test class

    target: AmqpTarget
    admin: RabbitAdmin
    vhost: str
    users: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.target.url(vhost=self.vhost)

    def add_user(self, username: str, password: str) -> str:
        self.admin.add_user(username, password)
        self.users.append(username)
        self.admin.grant_all(self.vhost, username)
        return self.target.url(vhost=self.vhost, user=username, password=password)

    def close(self) -> None:
        errors = []
        for user in reversed(self.users):
            try:
                self.admin.delete_user(user)
            except ServiceSetupError as exc:
                errors.append(str(exc))
        self.users.clear()
        try:
            self.admin.delete_vhost(self.vhost)
        except ServiceSetupError as exc:
            errors.append(str(exc))
        if errors:
            raise ServiceSetupError("RabbitMQ cleanup failed:\n" + "\n".join(errors))


def create_test_broker(target: AmqpTarget, vhost: str, admins: Sequence[RabbitAdmin]) -> TestBroker:
    """Create ``vhost`` (full permissions for ``target.user``) with the first admin that works."""
    failures = []
    for admin in admins:
        try:
            admin.add_vhost(vhost)
        except ServiceSetupError as exc:
            failures.append(f"- {admin.name}: {exc}")
            continue
        broker = TestBroker(target=target, admin=admin, vhost=vhost)
        try:
            admin.grant_all(vhost, target.user)
        except ServiceSetupError:
            broker.close()
            raise
        wait_for_vhost(broker.url)
        return broker
    raise ServiceSetupError(
        f"cannot create a RabbitMQ vhost on {target.host}:{target.port}; tried:\n"
        + "\n".join(failures)
        + "\nNeed either `rabbitmqctl` on PATH for a local broker, or the management plugin "
        "(port 15672, or RABBITMQ_MANAGEMENT_PORT) with an administrator user in AMQP_URL."
    )


def wait_for_vhost(url: str, timeout: float = 30.0) -> None:
    """Block until an AMQP connection to ``url`` succeeds (vhost started)."""
    import pika

    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    deadline = time.monotonic() + timeout
    while True:
        try:
            pika.BlockingConnection(params).close()
            return
        except pika.exceptions.AMQPError as exc:
            if time.monotonic() > deadline:
                raise ServiceSetupError(f"cannot connect to {redact(url)}: {exc!r}") from exc
            time.sleep(0.5)


def start_rabbitmq_container(image: str = "rabbitmq:3.13-management"):
    """Start a testcontainers RabbitMQ; return ``(container, target, admins)``."""
    try:  # testcontainers >= 4.15 layout
        from testcontainers.community.rabbitmq import RabbitMqContainer
    except ImportError:
        from testcontainers.rabbitmq import RabbitMqContainer

    container = _start_container(lambda: RabbitMqContainer(image), "RabbitMQ", "AMQP_URL")
    target = AmqpTarget(
        user=container.username,
        password=container.password,
        host=container.get_container_host_ip(),
        port=int(container.get_exposed_port(container.port)),
        vhost="/",
    )
    admins = [CtlAdmin(container_ctl_runner(container), "rabbitmqctl in test container")]
    return container, target, admins
