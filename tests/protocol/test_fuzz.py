"""Fuzzing: whatever bytes arrive, decoders raise nothing but ProtocolError.

About 11,000 cases in all, sized to run in well under 20 s.
"""

from __future__ import annotations

import struct

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import unpack
from protocol.errors import ProtocolError
from protocol.framing import FrameDecoder, encode_frame
from protocol.messages import Hello, Request, decode_message, encode_message

_SETTINGS = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from(["t", "nonce", "request_id", "method", "body", "code",
                                        "message", "topic", "node_id", "x"]), children, max_size=6),
    max_leaves=8,
)
_type_names = st.sampled_from(["hello", "ping", "pong", "error", "req", "resp", "notify", "nope"])
_SEEDS = [encode_message(Hello(1, "a", "b", "c", ("f",))), encode_message(Request(1, "m", [1, {"a": 2}]))]


@_SETTINGS
@given(data=st.binary(max_size=200))
def test_message_decoder_random_bytes(data: bytes) -> None:
    try:
        decode_message(data)
    except ProtocolError:
        pass


@_SETTINGS
@given(seed=st.sampled_from(_SEEDS), pos=st.integers(0, 200), byte=st.integers(0, 255),
       cut=st.integers(0, 200))
def test_message_decoder_mutated_valid_messages(seed: bytes, pos: int, byte: int, cut: int) -> None:
    data = bytearray(seed)
    data[pos % len(data)] = byte
    try:
        decode_message(bytes(data[: max(cut, 1)]))
    except ProtocolError:
        pass


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_msgpack_values, type_name=_type_names)
def test_message_decoder_valid_msgpack_of_any_shape(value: object, type_name: str) -> None:
    if isinstance(value, dict):
        value = {**value, "t": type_name}
    try:
        decode_message(msgpack.packb(value))
    except ProtocolError:
        pass


@_SETTINGS
@given(code=st.integers(-128, 127), data=st.binary(max_size=80))
def test_codec_random_ext_payloads(code: int, data: bytes) -> None:
    try:
        unpack(struct.pack(">BIb", 0xC9, len(data), code) + data)
    except ProtocolError:
        pass


@_SETTINGS
@given(chunks=st.lists(st.binary(max_size=64), max_size=10), max_size=st.integers(1, 2**20),
       eof=st.booleans())
def test_frame_decoder_random_streams(chunks: list[bytes], max_size: int, eof: bool) -> None:
    decoder = FrameDecoder(max_frame_size=max_size)
    try:
        for chunk in [*chunks, *([b""] if eof else [])]:
            decoder.receive_data(chunk)
            for frame in decoder:
                assert len(frame) <= max_size
                try:
                    decode_message(frame)
                except ProtocolError:
                    pass
        decoder.next_frame()
    except ProtocolError:
        pass


@_SETTINGS
@given(frames=st.lists(st.binary(max_size=50), max_size=5), junk=st.binary(max_size=20))
def test_frame_decoder_valid_frames_then_junk(frames: list[bytes], junk: bytes) -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    got: list[bytes] = []
    try:
        decoder.receive_data(b"".join(encode_frame(f) for f in frames) + junk)
        got = [bytes(f) for f in decoder]
    except ProtocolError:
        pass
    assert got[: len(frames)] == frames[: len(got)]
