"""Length-prefixed framing: arbitrary slicing, limits, truncation."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FrameTooLarge, ProtocolError, TruncatedFrame
from protocol.framing import FrameDecoder, encode_frame, frame_header


def _drain(decoder: FrameDecoder) -> list[bytes]:
    return [bytes(f) for f in decoder]


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(st.binary(max_size=300), max_size=8),
    big=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=70_000), max_size=30),
)
def test_any_slicing_yields_the_same_frames(frames: list[bytes], big: bool, cuts: list[int]) -> None:
    if big:  # exercise the in-place path for large frames
        frames = [*frames, bytes(range(256)) * 300]
    stream = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    out: list[bytes] = []
    pos = 0
    for n in [*cuts, len(stream)]:
        decoder.receive_data(stream[pos : pos + n])
        pos += n
        out += _drain(decoder)
    assert out == frames
    decoder.receive_data(b"")
    assert decoder.next_frame() is None


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(st.binary(max_size=200_000), max_size=4),
    sizes=st.lists(st.integers(min_value=1, max_value=400_000), min_size=1, max_size=20),
)
def test_buffered_protocol_interface(frames: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    out: list[bytes] = []
    pos, i = 0, 0
    while pos < len(stream):
        buf = decoder.get_buffer(-1)
        n = min(len(buf), len(stream) - pos, sizes[i % len(sizes)])
        i += 1
        buf[:n] = stream[pos : pos + n]
        decoder.buffer_updated(n)
        pos += n
        out += _drain(decoder)
    assert out == frames


def test_large_frame_is_filled_in_place_and_grows_with_what_arrives() -> None:
    payload = bytes(range(256)) * 4000  # ~1 MB
    decoder = FrameDecoder()
    decoder.receive_data(frame_header(len(payload)) + payload[:10])
    received = 10
    view = decoder.get_buffer(-1)
    while True:
        # Memory follows the bytes that came, never the size the header announced.
        assert decoder.allocated_bytes <= max(256 * 1024, 2 * received)
        take = min(len(view), len(payload) - received, 100_000)
        view[:take] = payload[received : received + take]
        owner = view.obj
        view.release()
        decoder.buffer_updated(take)
        received += take
        if received == len(payload):
            break
        view = decoder.get_buffer(-1)
    frame = decoder.next_frame()
    assert frame is not None and frame == payload
    assert frame is owner  # the last buffer handed out is the frame itself


def test_announcing_a_huge_frame_costs_nothing_until_it_is_sent() -> None:
    decoder = FrameDecoder(max_frame_size=64 * 2**20)
    tracemalloc.start()
    try:
        decoder.receive_data(frame_header(64 * 2**20 - 1) + b"x")
        decoder.get_buffer(-1).release()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_first_frame_limit_holds_only_the_first_frame() -> None:
    decoder = FrameDecoder(first_frame_limit=16 * 1024)
    big = b"y" * 100_000
    decoder.receive_data(encode_frame(b"hello") + encode_frame(big))
    assert decoder.next_frame() == b"hello" and decoder.next_frame() == big
    strict = FrameDecoder(first_frame_limit=16 * 1024)
    with pytest.raises(FrameTooLarge, match="first frame"):
        strict.receive_data(frame_header(64 * 2**20) + b"x")


def test_4gib_header_is_rejected_without_buffering() -> None:
    decoder = FrameDecoder(max_frame_size=64 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge) as err:
            decoder.receive_data(b"\xff\xff\xff\xff" + b"x" * 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert err.value.size == 2**32 - 1 and err.value.code == "frame_too_large"
    assert "exceeds the limit" in str(err.value)
    # the decoder stays failed
    with pytest.raises(FrameTooLarge):
        decoder.receive_data(b"\0")


def test_oversized_frame_rejected_from_header_alone() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data(encode_frame(b"a" * 100))
    assert decoder.next_frame() == b"a" * 100
    with pytest.raises(FrameTooLarge):
        decoder.receive_data(frame_header(101))


@pytest.mark.parametrize("partial", [b"\x00", b"\x00\x00\x00\x05ab", encode_frame(b"z" * 100_000)[:-1]])
def test_truncated_frame_at_eof(partial: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"ok") + partial)
    assert decoder.next_frame() == b"ok"
    assert decoder.next_frame() is None
    decoder.feed_eof()
    with pytest.raises(TruncatedFrame, match="ended inside a frame"):
        decoder.next_frame()


def test_data_after_eof_is_an_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError):
        decoder.receive_data(b"abc")


def test_bad_limits() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_size=0)
    with pytest.raises(FrameTooLarge):
        frame_header(2**32)
