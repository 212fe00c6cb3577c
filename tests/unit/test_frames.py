"""publishers.frames: the frames waiting in pika's transmit buffer go out in few `send()` calls, byte for byte."""
from __future__ import annotations

from collections import deque

import pika.exceptions
import pytest
from hypothesis import given, strategies as st
from pika import frame as pika_frame
from pika import spec
from pika.adapters.utils import io_services_utils
from pika.connection import Connection

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
    assert io_services_utils._AsyncTransportBase._MAX_RECV_BYTES == frames.RECV_BYTES
    assert Connection._on_data_available is frames.data_available


@pytest.mark.parametrize("missing", ["_produce", "_sigint_safe_send", "_MAX_RECV_BYTES"])
def test_it_leaves_a_pika_it_does_not_know_alone(monkeypatch, missing):
    class Other:
        _produce = _sigint_safe_send = None
        _MAX_RECV_BYTES = 4096

    monkeypatch.setattr(frames, "_Transport", Other)
    monkeypatch.delattr(Other, missing)
    assert frames.install() is False


@pytest.mark.parametrize("missing", ["_on_data_available", "_process_frame"])
def test_it_leaves_a_pika_connection_it_does_not_know_alone(monkeypatch, missing):
    class Other:
        _on_data_available = _process_frame = None

    class Transport:
        _produce = _sigint_safe_send = None
        _MAX_RECV_BYTES = 4096

    monkeypatch.setattr(frames, "_Connection", Other)
    monkeypatch.setattr(frames, "_Transport", Transport)
    monkeypatch.delattr(Other, missing)
    assert frames.install() is False
    assert Transport._MAX_RECV_BYTES == 4096


# -- receiving -----------------------------------------------------------------------------------------------------

class Receiver:
    """What `data_available` uses of a pika Connection; `reset_after`: frames after which it resets its buffer, as a
    closing connection does."""

    def __init__(self, reset_after: int | None = None) -> None:
        self._frame_buffer = b""
        self.bytes_received = 0
        self.frames: list[bytes] = []
        self.reset_after = reset_after

    def _process_frame(self, frame: object) -> None:
        self.frames.append(frame.marshal())
        if self.reset_after is not None and len(self.frames) == self.reset_after:
            self._frame_buffer = b""


def delivery_frames(body: bytes, tag: int) -> list[bytes]:
    """A delivery as the broker sends it: method, header and the body in frames of at most 4096 bytes."""
    method = pika_frame.Method(1, spec.Basic.Deliver("ctag", tag, False, "", "intyg.registration"))
    header = pika_frame.Header(1, len(body), spec.BasicProperties(message_id=f"m{tag}", headers={"h": "v"}))
    return [method.marshal(), header.marshal()] + [pika_frame.Body(1, body[i:i + 4096]).marshal()
                                                   for i in range(0, len(body), 4096)]


def reference(stream: bytes) -> list[bytes]:
    """pika's own decoder, one frame after the other over the whole stream."""
    out = []
    while stream:
        consumed, frame = pika_frame.decode_frame(stream)
        if frame is None:
            break
        out.append(frame.marshal())
        stream = stream[consumed:]
    return out


@given(bodies=st.lists(st.binary(max_size=20_000), min_size=1, max_size=8),
       cuts=st.lists(st.integers(min_value=1, max_value=30_000), max_size=30))
def test_frames_arriving_in_pieces_of_any_size_are_each_processed_once_in_order(bodies, cuts):
    stream = b"".join(f for tag, body in enumerate(bodies, 1) for f in delivery_frames(body, tag))
    receiver, offset = Receiver(), 0
    for cut in cuts + [len(stream)]:
        piece = stream[offset:offset + cut]
        offset += len(piece)
        if piece:
            frames.data_available(receiver, piece)
    assert receiver.frames == reference(stream)
    assert receiver.bytes_received == len(stream) and receiver._frame_buffer == b""


def test_an_incomplete_frame_waits_for_the_rest():
    sent = delivery_frames(b"x" * 10_000, 1)
    stream = b"".join(sent)
    receiver = Receiver()
    frames.data_available(receiver, stream[:-100])
    assert len(receiver.frames) == len(sent) - 1 and receiver._frame_buffer == sent[-1][:-100]
    frames.data_available(receiver, stream[-100:])
    assert receiver.frames == reference(stream) and receiver._frame_buffer == b""


def test_frames_after_the_connection_reset_its_buffer_are_dropped():
    stream = b"".join(delivery_frames(b"y" * 100, 1) + delivery_frames(b"z" * 100, 2))
    receiver = Receiver(reset_after=2)
    frames.data_available(receiver, stream)
    assert receiver.frames == reference(stream)[:2] and receiver._frame_buffer == b""


def test_a_frame_with_a_bad_end_marker_raises_as_in_pika():
    broken = bytearray(b"".join(delivery_frames(b"q" * 50, 1)))
    broken[-1] = 0
    with pytest.raises(pika.exceptions.InvalidFrameError):
        frames.data_available(Receiver(), bytes(broken))


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
