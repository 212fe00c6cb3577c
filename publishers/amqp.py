"""How every connection of the service reaches the broker: a list of node URLs, optionally over verified TLS.

`AMQP_URL` may name several nodes of one cluster, comma-separated. Each new connection tries them in a shuffled
order (so that instances spread over the nodes) and takes the first that answers; a connection that is lost is
opened again the same way, so losing a node moves the service to another one. A `SelectConnection` takes one node
at a time: `next_node` hands out the nodes in turn (a shuffled round robin per broker), so a relay whose node is
gone reaches another on its next attempt.

TLS: an `amqps://` node is always verified (certificate chain and host name). The CA bundle is `ca_file` (else the
system's), and a client certificate (`cert_file`, `key_file`) is sent when given.

Errors never show a password: a malformed entry is named by its position and its redacted text, an unreachable
node by host and port.
"""
from __future__ import annotations

import functools
import itertools
import random
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pika
from pika.exceptions import AMQPConnectionError

from publishers import frames

frames.install()  # every connection of the service is opened through this module

BLOCKED_CONNECTION_TIMEOUT_S = 120  # a broker alarm that never clears ends in a reconnect


class BrokerUrlError(ValueError):
    """`AMQP_URL` (or one entry of its list) is not a usable broker URL."""


class BrokerUnreachable(AMQPConnectionError):
    """No node of the list accepted a connection; the message names each node and why."""


def redact(url: str) -> str:
    """`url` with its password replaced by `***` (works on URLs too broken for `urlsplit`)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}{slash}{tail}"


def split_nodes(amqp_url: str) -> list[str]:
    """The node URLs of a comma-separated list, each checked; raises `BrokerUrlError` naming a bad entry."""
    entries = [entry.strip() for entry in amqp_url.split(",")]
    if not any(entries):
        raise BrokerUrlError("AMQP_URL is empty")
    for position, entry in enumerate(entries, 1):
        _check(entry, position, len(entries))
    return entries


def _check(entry: str, position: int, count: int) -> None:
    where = f"AMQP_URL entry {position} of {count}"
    if not entry:
        raise BrokerUrlError(f"{where} is empty (a stray comma?)")
    try:
        parts = urlsplit(entry)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(f"scheme must be amqp or amqps, not {parts.scheme or 'missing'!r}")
        if not parts.hostname:
            raise ValueError("no host")
        _url_parameters(entry)
    except ValueError as exc:
        raise BrokerUrlError(f"{where} ({redact(entry)}) is not a broker URL: {_without(exc, entry)}") from None


def _without(exc: Exception, entry: str) -> str:
    """The error text, with the password cut out should it quote the entry."""
    text = str(exc)
    try:
        password = urlsplit(entry).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


@dataclass(frozen=True)
class Broker:
    """Where and how to connect: `url` is one node URL or several, comma-separated; TLS files for amqps nodes."""

    url: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def of(cls, target: str | Broker) -> Broker:
        return target if isinstance(target, Broker) else cls(target)

    @classmethod
    def from_settings(cls, settings: Any, url: str | None = None) -> Broker:
        """From the service's settings (duck-typed: consumers and publishers do not import them)."""
        return cls(url if url is not None else settings.amqp_url,
                   ca_file=getattr(settings, "amqp_ca_file", None) or None,
                   cert_file=getattr(settings, "amqp_cert_file", None) or None,
                   key_file=getattr(settings, "amqp_key_file", None) or None)

    def nodes(self) -> list[str]:
        return split_nodes(self.url)

    @property
    def user(self) -> str:
        return _url_parameters(self.nodes()[0])[0].credentials.username

    def describe(self) -> str:
        return ",".join(redact(node) for node in self.url.split(","))

    def parameters(self, connection_name: str | None = None, *, shuffle: bool = True) -> list[pika.URLParameters]:
        """One `URLParameters` per node, in a random order unless `shuffle` is false."""
        params = [self._parameters(node, connection_name) for node in self.nodes()]
        if shuffle:
            random.shuffle(params)
        return params

    def _parameters(self, node: str, connection_name: str | None) -> pika.URLParameters:
        params, tls = _url_parameters(node)
        if connection_name is not None:
            params.client_properties = {"connection_name": connection_name, "product": "intygstjanst"}
        if "blocked_connection_timeout" not in node:
            params.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT_S
        if tls:
            context = _tls_context(self.ca_file, self.cert_file, self.key_file)
            params.ssl_options = pika.SSLOptions(context, server_hostname=params.host)
        return params


def _url_parameters(node: str) -> tuple[pika.URLParameters, bool]:
    """pika's reading of one node URL, and whether it is amqps. pika would build a default TLS context for an
    amqps URL (loading the system's CA bundle: slow), which `Broker` replaces anyway, so it reads it as amqp."""
    tls = node.startswith("amqps://")
    params = pika.URLParameters("amqp://" + node.removeprefix("amqps://") if tls else node)
    if tls and urlsplit(node).port is None:
        params.port = pika.ConnectionParameters.DEFAULT_SSL_PORT
    return params, tls


@functools.lru_cache(maxsize=8)
def _tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """One context per set of files (loading a CA bundle takes a while), shared by every connection."""
    context = ssl.create_default_context(cafile=ca_file)  # verifies the chain and the host name
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def connect(target: str | Broker, connection_name: str | None = None) -> pika.BlockingConnection:
    """A `BlockingConnection` to the first node (in shuffled order) that accepts one. Raises `BrokerUnreachable`
    naming every node tried and why it failed (an `AMQPConnectionError`, so callers' reconnect loops apply)."""
    broker = Broker.of(target)
    failures = []
    for params in broker.parameters(connection_name):
        try:
            return pika.BlockingConnection(params)
        except (AMQPConnectionError, OSError) as exc:  # pika raises a failed TLS handshake as the ssl error itself
            failures.append(f"{node_name(params)}: {describe_failure(exc)}")
    raise BrokerUnreachable("no broker node accepted a connection: " + "; ".join(failures))


def node_name(params: pika.ConnectionParameters) -> str:
    return f"{'amqps' if params.ssl_options else 'amqp'}://{params.host}:{params.port}"


def describe_failure(exc: BaseException) -> str:
    """The innermost reason pika wraps (refused, TLS verification, access refused...), without the URL."""
    current: BaseException = exc
    while True:  # pika nests: AMQPConnectionError(WorkflowFailed(exceptions=[...Error(exception=OSError(...))]))
        inner = getattr(current, "exception", None) or (getattr(current, "exceptions", None) or [None])[-1]
        if inner is None and current.args and isinstance(current.args[0], BaseException):
            inner = current.args[0]
        if not isinstance(inner, BaseException):
            break
        current = inner
    text = str(current)
    return f"{type(current).__name__}: {text}" if text else type(current).__name__


_rotations: dict[tuple[Broker, str | None], Iterator[pika.URLParameters]] = {}
_rotations_lock = threading.Lock()


def next_node(target: str | Broker, connection_name: str | None = None) -> pika.URLParameters:
    """The parameters of the next node in a shuffled round robin of `target` (for a `SelectConnection`, which
    takes one node: each reconnect goes to the next one)."""
    broker = Broker.of(target)
    key = (broker, connection_name)
    with _rotations_lock:
        rotation = _rotations.get(key)
        if rotation is None:
            rotation = _rotations[key] = itertools.cycle(broker.parameters(connection_name))
        return next(rotation)


__all__ = ["Broker", "BrokerUnreachable", "BrokerUrlError", "connect", "describe_failure", "next_node",
           "node_name", "redact", "split_nodes"]
