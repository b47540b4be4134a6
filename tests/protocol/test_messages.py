"""Typed messages: round trips, unknown types, wrong shapes, the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest

from protocol.errors import DecodeError, EncodeError, UnknownMessageType
from protocol.messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    Message,
    Notify,
    Ping,
    Pong,
    Request,
    Response,
    decode_message,
    encode_message,
    encode_message_parts,
    message,
    message_types,
)

SAMPLES: list[Message] = [
    Hello(PROTOCOL_VERSION, "ab" * 32, "node-a", "0.1.0", ("tensors", "dht")),
    Hello(PROTOCOL_VERSION, "cd" * 32, "", "0.1.0"),
    Ping(0),
    Pong(2**63 - 1),
    Error("handler_error", "boom", 17),
    Error("protocol_version", "bad version"),
    Request(1, "echo", {"x": [1, 2, 3]}),
    Request(2, "nothing"),
    Response(1, {"ok": True}),
    Notify("token", {"text": "hola"}),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    assert decode_message(encode_message(msg)) == msg


def test_tensor_body_round_trip_and_parts_match() -> None:
    body = {"hidden": np.arange(70_000, dtype=np.float32)}
    msg = Response(9, body)
    parts = encode_message_parts(msg)
    assert any(isinstance(p, memoryview) for p in parts)
    out = decode_message(b"".join(parts))
    assert isinstance(out, Response)
    np.testing.assert_array_equal(out.body["hidden"], body["hidden"])


def test_messages_are_frozen_and_slotted() -> None:
    ping = Ping(1)
    with pytest.raises(AttributeError):
        ping.nonce = 2  # type: ignore[misc]
    assert not hasattr(ping, "__dict__")


def test_wire_form_is_a_map_with_type_tag() -> None:
    assert msgpack.unpackb(encode_message(Ping(5))) == {"t": "ping", "nonce": 5}


def test_unknown_type_carries_request_id() -> None:
    data = msgpack.packb({"t": "teleport", "request_id": 12})
    with pytest.raises(UnknownMessageType) as err:
        decode_message(data)
    assert err.value.type_name == "teleport"
    assert err.value.request_id == 12
    assert "newer enjambre" in str(err.value)


@pytest.mark.parametrize(
    "value",
    [
        [1, 2],
        "ping",
        {"nonce": 1},
        {"t": 5, "nonce": 1},
        {"t": "ping"},
        {"t": "ping", "nonce": "1"},
        {"t": "ping", "nonce": True},
        {"t": "ping", "nonce": 1.5},
        {"t": "hello", "protocol_version": 1, "node_id": "x", "name": "n",
         "software_version": "1", "features": "abc"},
        {"t": "hello", "protocol_version": 1, "node_id": "x", "name": "n",
         "software_version": "1", "features": [1]},
        {"t": "error", "code": "c", "message": "m", "request_id": "7"},
        {"t": "req", "method": "m", "body": None},
    ],
)
def test_wrong_shapes_raise_decode_error(value: Any) -> None:
    with pytest.raises(DecodeError):
        decode_message(msgpack.packb(value))


def test_extra_fields_are_ignored_for_forward_compatibility() -> None:
    assert decode_message(msgpack.packb({"t": "ping", "nonce": 3, "new": 1})) == Ping(3)


def test_registry_accepts_new_types() -> None:
    @message("test_only_fetch")
    @dataclass(frozen=True, slots=True)
    class Fetch(Message):
        piece: int
        note: str | None = None

    assert message_types()["test_only_fetch"] is Fetch
    assert decode_message(encode_message(Fetch(4))) == Fetch(4)
    with pytest.raises(ValueError, match="already registered"):
        message("test_only_fetch")(Fetch)


def test_unregistered_class_cannot_be_encoded() -> None:
    @dataclass(frozen=True)
    class Loose(Message):
        x: int

    with pytest.raises(EncodeError, match="not a registered"):
        encode_message(Loose(1))
