"""publishers.frames: the frames waiting in pika's transmit buffer go out in few `send()` calls, byte for byte."""
from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, strategies as st
from pika.adapters.utils import io_services_utils

from publishers import frames


class Transport:
    """What `produce` reads of pika's transport; its socket takes at most `take` bytes a call, then blocks."""

    def __init__(self, chunks: list[bytes], takes: list[int]) -> None:
        self._tx_buffers = deque(chunks)
        self._tx_buffered_byte_count = sum(map(len, chunks))
        self._sock = None
        self.takes = deque(takes)
        self.wire = bytearray()
        self.sends = 0

    def _sigint_safe_send(self, _sock: object, data: bytes) -> int:
        if not self.takes:
            raise BlockingIOError("EAGAIN")
        self.sends += 1
        n = min(len(data), self.takes.popleft())
        self.wire += data[:n]
        return n


def drain(transport: Transport) -> None:
    while True:
        try:
            frames.produce(transport)
            return
        except BlockingIOError:
            transport.takes.extend([1 << 20] * 4)  # writable again


def test_a_batch_of_small_frames_goes_out_in_one_send():
    chunks = [b"m" * 40, b"h" * 30, b"b" * 300] * 300  # 300 messages of three frames, 111 KB
    transport = Transport(chunks, [1 << 20] * 10)
    frames.produce(transport)
    assert transport.sends == 1 and bytes(transport.wire) == b"".join(chunks)
    assert transport._tx_buffered_byte_count == 0 and not transport._tx_buffers


@given(chunks=st.lists(st.binary(min_size=1, max_size=70_000), min_size=1, max_size=40),
       takes=st.lists(st.integers(min_value=0, max_value=200_000), max_size=20))
def test_partial_sends_and_a_blocked_socket_lose_and_reorder_nothing(chunks, takes):
    transport = Transport(chunks, takes)
    drain(transport)
    assert bytes(transport.wire) == b"".join(chunks)
    assert transport._tx_buffered_byte_count == 0 and not transport._tx_buffers


def test_the_service_sends_through_it():
    import publishers.amqp  # noqa: F401 - installs it

    assert io_services_utils._AsyncTransportBase._produce is frames.produce


@pytest.mark.parametrize("missing", ["_produce", "_sigint_safe_send"])
def test_it_leaves_a_pika_it_does_not_know_alone(monkeypatch, missing):
    class Other:
        _produce = _sigint_safe_send = None

    monkeypatch.setattr(frames, "_Transport", Other)
    monkeypatch.delattr(Other, missing)
    assert frames.install() is False


def test_a_buffered_publish_is_sent_by_the_next_io_not_at_once():
    calls = []

    class Impl:
        def basic_publish(self, **kwargs):
            calls.append(("queued", kwargs["routing_key"]))

    class Channel:
        _impl = Impl()

        def basic_publish(self, *args):
            calls.append(("flushed", args[1]))

    frames.publish_buffered(Channel(), "", "reply-queue", b"{}", None)
    assert calls == [("queued", "reply-queue")]
