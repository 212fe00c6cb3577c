"""Fewer system calls per published message: pika hands every frame to the socket with a `send()` of its own.

A message is at least three frames (method, header, body), and an ack is one more, so the relay's batch of 500
events cost some 1,500 `send()` calls, each a trip through the kernel's TCP stack (on loopback also the broker's
receive path). Profiled under load (py-spy, issue 10), `send()` was 42 % of the relay process's samples. Here
the frames waiting in pika's transmit buffer are joined into one `send()` of at most `MAX_SEND_BYTES`; what the
socket does not take stays at the front of the buffer, as pika's own loop leaves it.

`install()` replaces `_AsyncTransportBase._produce` (used by the plain and the TLS transport, and under every
BlockingConnection) and refuses to, leaving pika as it is, if that method or the send it relies on is not where
pika 1.x keeps them (written against 1.4). Over TLS a send that would block must be retried with the same bytes
or more (OpenSSL refuses a shorter retry): after a blocked send the front of the buffer is only ever extended.

`publish_buffered()` is a BlockingChannel's publish without the flush that follows each one, so that the replies
of a batch wait in the transmit buffer and leave with their `tx.commit` in one `send()`.
"""
from __future__ import annotations

from typing import Any

from pika.adapters.utils import io_services_utils

MAX_SEND_BYTES = 128 * 1024  # a bigger join copies more than a syscall costs

_Transport = io_services_utils._AsyncTransportBase  # noqa: SLF001 - the one place that touches pika's internals


def produce(transport: Any) -> None:
    """Send `transport._tx_buffers` until empty or the socket raises (EAGAIN: pika waits for writability)."""
    buffers = transport._tx_buffers
    while buffers:
        if len(buffers) > 1 and len(buffers[0]) < MAX_SEND_BYTES:
            joined, size = [], 0
            while buffers and size < MAX_SEND_BYTES:
                chunk = buffers.popleft()
                joined.append(chunk)
                size += len(chunk)
            buffers.appendleft(b"".join(joined))
        sent = transport._sigint_safe_send(transport._sock, buffers[0])
        chunk = buffers.popleft()
        if sent < len(chunk):
            buffers.appendleft(chunk[sent:])
        transport._tx_buffered_byte_count -= sent


def publish_buffered(channel: Any, exchange: str, routing_key: str, body: bytes, properties: Any) -> None:
    """Queue a publish on a BlockingChannel (not in confirm mode); it is sent at the connection's next I/O."""
    impl = getattr(channel, "_impl", None)  # the pika Channel a BlockingChannel drives
    if impl is None:
        channel.basic_publish(exchange, routing_key, body, properties)
    else:
        impl.basic_publish(exchange=exchange, routing_key=routing_key, body=body, properties=properties)


def install() -> bool:
    """Idempotent; False when pika's transport is not the one this was written for."""
    if getattr(_Transport, "_produce", None) is produce:
        return True
    if not (callable(getattr(_Transport, "_produce", None)) and callable(getattr(_Transport, "_sigint_safe_send",
                                                                                 None))):
        return False
    _Transport._produce = produce
    return True
