"""Brokers and databases of a test's own, started from the binaries installed on the machine on free ports, for the
tests that kill them (the machine's own RabbitMQ and PostgreSQL are never touched).

    with RabbitCluster(3) as cluster:          # three clustered RabbitMQ nodes, guest/guest on vhost "/"
        cluster.amqp_url                       # "amqp://guest:guest@127.0.0.1:p1/%2F,...,...p3/%2F"
        cluster.kill(node)                     # SIGKILL; cluster.start(node) brings it back into the cluster

    with PostgresPair(synchronous=True) as pg: # a primary and a streaming (synchronous) standby
        pg.database_url()                      # libpq multi-host form with target_session_attrs=read-write
        pg.primary.kill(); pg.standby.promote()

Everything lives in a temporary directory and is stopped and removed on exit, also when the test fails. The nodes
get their own Erlang cookie (a HOME of their own) so they cannot talk to the machine's own node.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
PG_BIN = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]) if Path("/usr/lib/postgresql").exists() \
    else Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def _kill_group(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)


class _Started:
    """`with X(...) as x:` starts `x` and always takes everything down again, also when starting fails half-way."""

    def _start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - the subclass
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RabbitNode:
    name: str  # itest-xxxx-1@localhost
    port: int
    dist_port: int
    base: Path
    tls_port: int | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def tls_url(self, host: str = "localhost") -> str:
        return f"amqps://guest:guest@{host}:{self.tls_port}/%2F"


class RabbitCluster(_Started):
    """`size` RabbitMQ nodes joined into one cluster. `tls` = (ca, cert, key) files adds an amqps listener."""

    def __init__(self, size: int = 3, *, tls: tuple[Path, Path, Path] | None = None, boot_timeout: float = 120.0):
        self.root = Path(tempfile.mkdtemp(prefix="itest-rabbit-"))
        self.tls = tls
        self.boot_timeout = boot_timeout
        run = secrets.token_hex(3)
        (self.root / ".erlang.cookie").write_text(secrets.token_hex(16).upper())
        (self.root / ".erlang.cookie").chmod(0o400)
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")  # not the machine's: it names the machine's node
        self.nodes = [RabbitNode(f"itest-{run}-{i}@localhost", free_port(), free_port(), self.root / f"node{i}",
                                 free_port() if tls else None) for i in range(1, size + 1)]

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def _start(self) -> None:
        for node in self.nodes:
            self.start(node, wait=False)
        for node in self.nodes:
            self._wait_booted(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        for node in self.nodes:
            self._wait_booted(node)

    def close(self) -> None:
        for node in self.nodes:
            _kill_group(node.process)
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def amqp_url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def env(self, node: RabbitNode) -> dict[str, str]:
        node.base.mkdir(parents=True, exist_ok=True)
        config = node.base / "rabbitmq.conf"
        lines = [f"listeners.tcp.default = 127.0.0.1:{node.port}", "loopback_users = none",
                 "disk_free_limit.absolute = 50MB", "log.console = false", "log.file.level = info"]
        if self.tls is not None:
            ca, cert, key = self.tls
            lines += [f"listeners.ssl.default = 127.0.0.1:{node.tls_port}", f"ssl_options.cacertfile = {ca}",
                      f"ssl_options.certfile = {cert}", f"ssl_options.keyfile = {key}",
                      # clients must show a certificate of the same CA
                      "ssl_options.verify = verify_peer", "ssl_options.fail_if_no_peer_cert = true"]
        config.write_text("\n".join(lines) + "\n")
        return {**{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
                "HOME": str(self.root),
                "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(node.port),
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node.base / "log"),
                "RABBITMQ_CONFIG_FILE": str(config),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(node.base / "pid"),
                "ERL_EPMD_ADDRESS": "127.0.0.1"}

    def start(self, node: RabbitNode, *, wait: bool = True) -> None:
        log = open(node.base.parent / f"{node.base.name}.out", "ab") if node.base.parent.exists() else None
        node.process = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env(node),
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        if log is not None:
            log.close()
        if wait:
            self._wait_booted(node)

    def kill(self, node: RabbitNode) -> None:
        """SIGKILL: no goodbye to clients or to the other nodes."""
        _kill_group(node.process)
        node.process = None

    def ctl(self, node: RabbitNode, *args: str, timeout: float = 60.0) -> str:
        done = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", node.name, *args], env=self.env(node),
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {node.name} {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def _wait_booted(self, node: RabbitNode) -> None:
        deadline = time.monotonic() + self.boot_timeout
        while True:
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"{node.name} exited ({node.process.returncode}); see {node.base}.out")
            try:
                self.ctl(node, "await_startup", "--timeout", "5", timeout=30)
                wait_port(node.port, 10, node.name)
                return
            except (RuntimeError, subprocess.TimeoutExpired, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def node_of_port(self, port: int) -> RabbitNode:
        return next(node for node in self.nodes if node.port == port or node.tls_port == port)


# --------------------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------------------


def _postgres_user() -> tuple[int, int] | None:
    """initdb refuses to run as root: as root, run the server as the `postgres` OS user."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


class PostgresServer:
    """One PostgreSQL instance in `data` on `port` (trust authentication for local TCP, user postgres)."""

    def __init__(self, root: Path, name: str, port: int | None = None) -> None:
        self.data = root / name
        self.port = port or free_port()
        self.log = root / f"{name}.log"
        self.root = root

    def _run(self, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        owner = _postgres_user()
        kwargs: dict = {"user": owner[0], "group": owner[1]} if owner else {}
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=self.root,
                              env={**os.environ, "LC_ALL": "C.UTF-8"}, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])}: {done.stdout}{done.stderr}")
        return done

    def initdb(self, conf: dict[str, str]) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.configure(conf)
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\nhostssl all all 127.0.0.1/32 trust\n")

    def configure(self, conf: dict[str, str]) -> None:
        lines = {"port": str(self.port), "listen_addresses": "'127.0.0.1'", "unix_socket_directories": f"'{self.root}'",
                 "fsync": "off", **conf}
        with open(self.data / "postgresql.auto.conf", "a") as auto:
            auto.write("".join(f"{k} = {v}\n" for k, v in lines.items()))

    def start(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster (its children notice and exit): a crash, not a shutdown."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    time.sleep(0.2)
                except OSError:
                    break

    def promote(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "promote")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


class PostgresPair(_Started):
    """A primary and, with `standby`, a streaming standby made by `pg_basebackup -R`; `synchronous` makes every
    commit wait for the standby (`synchronous_standby_names`, `synchronous_commit = on`)."""

    def __init__(self, *, standby: bool = True, synchronous: bool = True, ssl: tuple[Path, Path, Path] | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="itest-pg-"))
        owner = _postgres_user()
        if owner:
            os.chown(self.root, *owner)
        self.ssl = ssl
        self.primary = PostgresServer(self.root, "primary")
        self.standby = PostgresServer(self.root, "standby") if standby else None
        self.synchronous = synchronous

    def _start(self) -> None:
        conf = {"wal_level": "replica", "max_wal_senders": "5", "hot_standby": "on"}
        if self.synchronous and self.standby is not None:
            conf |= {"synchronous_standby_names": "'*'", "synchronous_commit": "on"}
        if self.ssl is not None:
            conf |= self._ssl_conf()
        self.primary.initdb(conf)
        self.primary.start()
        if self.standby is not None:
            self.primary._run(str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary.port),
                              "-U", "postgres", "-D", str(self.standby.data), "-R", "-X", "stream")
            # once promoted it has no standby of its own: it must not wait for one on every commit
            self.standby.configure({"port": str(self.standby.port), "synchronous_standby_names": "''"})
            self.standby.start()
            self._wait_streaming()

    def close(self) -> None:
        for server in (self.standby, self.primary):
            if server is not None and server.data.exists():
                server.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def _ssl_conf(self) -> dict[str, str]:
        assert self.ssl is not None
        owner = _postgres_user()
        copies = []
        for path in self.ssl:  # the server wants its key readable by itself only
            copy = self.root / f"server-{path.name}"
            shutil.copy(path, copy)
            copy.chmod(0o600)
            if owner:
                os.chown(copy, *owner)
            copies.append(copy)
        ca, cert, key = copies
        return {"ssl": "on", "ssl_ca_file": f"'{ca}'", "ssl_cert_file": f"'{cert}'", "ssl_key_file": f"'{key}'"}

    def _wait_streaming(self, timeout: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with psycopg.connect(self.primary.url(), autocommit=True) as conn:
                state = conn.execute("SELECT sync_state FROM pg_stat_replication").fetchone()
            if state is not None and (not self.synchronous or state[0] == "sync"):
                return
            time.sleep(0.3)
        raise TimeoutError("the standby did not start streaming")

    def database_url(self, database: str = "postgres") -> str:
        hosts = [self.primary] + ([self.standby] if self.standby is not None else [])
        return (f"postgresql://postgres@{','.join(f'127.0.0.1:{s.port}' for s in hosts)}/{database}"
                "?target_session_attrs=read-write")


# --------------------------------------------------------------------------------------------------------------
# A certificate authority for TLS tests (openssl CLI)
# --------------------------------------------------------------------------------------------------------------


class TestCA:
    """A CA made for one test, and certificates it signs (for 127.0.0.1 / localhost)."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "itest CA") -> None:
        self.dir = directory
        self.cert = directory / "ca.pem"
        self.key = directory / "ca.key"
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key), "-out",
                      str(self.cert), "-days", "2", "-subj", f"/CN={name}")

    def issue(self, name: str, *, hosts: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",),
              client: bool = False) -> tuple[Path, Path]:
        cert, key, csr = self.dir / f"{name}.pem", self.dir / f"{name}.key", self.dir / f"{name}.csr"
        ext = self.dir / f"{name}.ext"
        san = ",".join([f"DNS:{h}" for h in hosts] + [f"IP:{i}" for i in ips])
        usage = "clientAuth" if client else "serverAuth"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                      "-subj", f"/CN={hosts[0] if hosts else name}")
        self._openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                      "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
        for path in (cert, key, self.cert):
            path.chmod(0o644)
        return cert, key

    @staticmethod
    def _openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)


__all__ = ["PostgresPair", "PostgresServer", "RabbitCluster", "RabbitNode", "TestCA", "free_port", "wait_port"]
