"""The typed messages of the node-to-node protocol (version 1) and their encoding.

Each message is a frozen, slotted dataclass, encoded as a msgpack map
``{"t": "<type>", <field>: <value>, ...}``. Decoding checks every field's type,
so code above this layer never sees a message of the wrong shape. Unknown extra
fields are ignored, which lets a later version add optional fields.

Later issues add message types with :func:`message`::

    @message("fetch_piece")
    @dataclass(frozen=True, slots=True)
    class FetchPiece(Message):
        piece: int

Most features, though, need no new type: :class:`Request` / :class:`Response`
carry a method name and an arbitrary msgpack body.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, TypeVar, Union

from protocol.codec import DEFAULT_MAX_SIZE, pack_parts, unpack
from protocol.errors import DecodeError, EncodeError, UnknownMessageType

__all__ = [
    "PROTOCOL_VERSION",
    "Error",
    "Hello",
    "Message",
    "Notify",
    "Ping",
    "Pong",
    "Request",
    "Response",
    "decode_message",
    "encode_message",
    "encode_message_parts",
    "message",
    "message_types",
]

PROTOCOL_VERSION = 1


class Message:
    """Base of all wire messages; ``TYPE`` is the ``"t"`` value on the wire."""

    __slots__ = ()
    TYPE: ClassVar[str] = ""


_M = TypeVar("_M", bound=type[Message])
_Checker = Callable[[Any], Any]  # returns the (normalised) value or raises TypeError


@dataclass(frozen=True, slots=True)
class _Spec:
    cls: type[Message]
    fields: tuple[tuple[str, _Checker | None, type | None, bool], ...]  # name, checker, exact type, required
    names: tuple[str, ...]


_REGISTRY: dict[str, _Spec] = {}


def _checker_for(hint: Any) -> _Checker:
    """A function validating a decoded value against a field's type hint."""
    if hint is Any:
        return lambda v: v
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [_checker_for(a) for a in typing.get_args(hint)]

        def check_union(v: Any) -> Any:
            for check in options:
                try:
                    return check(v)
                except TypeError:
                    pass
            raise TypeError(f"expected {hint}")

        return check_union
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported field type {hint}: use tuple[X, ...]")
        item = _checker_for(args[0])

        def check_tuple(v: Any) -> Any:
            if not isinstance(v, list | tuple):
                raise TypeError(f"expected a list, got {type(v).__name__}")
            return tuple(item(x) for x in v)

        return check_tuple
    if hint is type(None):

        def check_none(v: Any) -> Any:
            if v is not None:
                raise TypeError(f"expected null, got {type(v).__name__}")
            return v

        return check_none
    if hint in (int, str, bytes, bool, float):

        def check_scalar(v: Any) -> Any:
            # bool is an int subclass but never a valid int field
            if hint is float and isinstance(v, int) and not isinstance(v, bool):
                return float(v)
            if type(v) is not hint:
                raise TypeError(f"expected {hint.__name__}, got {type(v).__name__}")
            return v

        return check_scalar
    raise TypeError(f"unsupported field type {hint!r}")


def message(type_name: str) -> Callable[[_M], _M]:
    """Class decorator registering a message dataclass under wire type ``type_name``."""

    def register(cls: _M) -> _M:
        if type_name in _REGISTRY:
            raise ValueError(f"message type {type_name!r} is already registered")
        if type_name == "" or not isinstance(type_name, str):
            raise ValueError("a message type name must be a non-empty string")
        hints = typing.get_type_hints(cls)
        specs: list[tuple[str, _Checker | None, type | None, bool]] = []
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name == "t":
                raise ValueError("a message field may not be called 't' (it holds the type)")
            required = f.default is MISSING and f.default_factory is MISSING
            hint = hints[f.name]
            # Plain int/str/bytes/bool fields and Any get an inline check (hot path).
            exact = hint if hint in (int, str, bytes, bool) else None
            checker = None if exact is not None or hint is Any else _checker_for(hint)
            specs.append((f.name, checker, exact, required))
        cls.TYPE = type_name
        _REGISTRY[type_name] = _Spec(cls, tuple(specs), tuple(s[0] for s in specs))
        return cls

    return register


def message_types() -> dict[str, type[Message]]:
    """Every registered wire type name and its class."""
    return {name: spec.cls for name, spec in _REGISTRY.items()}


# ------------------------------------------------------------------ version 1 messages


@message("hello")
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message on every connection, sent by both sides."""

    protocol_version: int
    node_id: str
    name: str
    software_version: str
    features: tuple[str, ...] = ()


@message("ping")
@dataclass(frozen=True, slots=True)
class Ping(Message):
    nonce: int


@message("pong")
@dataclass(frozen=True, slots=True)
class Pong(Message):
    nonce: int


@message("error")
@dataclass(frozen=True, slots=True)
class Error(Message):
    """A failure: the answer to request ``request_id``, or about the connection if None."""

    code: str
    message: str
    request_id: int | None = None


@message("req")
@dataclass(frozen=True, slots=True)
class Request(Message):
    request_id: int
    method: str
    body: Any = None


@message("resp")
@dataclass(frozen=True, slots=True)
class Response(Message):
    request_id: int
    body: Any = None


@message("notify")
@dataclass(frozen=True, slots=True)
class Notify(Message):
    """A one-way message; no answer is sent."""

    topic: str
    body: Any = None


# ------------------------------------------------------------------ encode / decode


def _as_map(msg: Message) -> dict[str, Any]:
    spec = _REGISTRY.get(type(msg).TYPE)
    if spec is None or spec.cls is not type(msg):
        raise EncodeError(f"{type(msg).__name__} is not a registered message type")
    out: dict[str, Any] = {"t": spec.cls.TYPE}
    for name in spec.names:
        out[name] = getattr(msg, name)
    return out


def encode_message_parts(msg: Message) -> list[bytes | memoryview]:
    """Encode ``msg`` as buffers; large arrays in it are referenced, not copied."""
    return pack_parts(_as_map(msg))


def encode_message(msg: Message) -> bytes:
    """Encode ``msg`` as one ``bytes`` object (the payload of one frame)."""
    return b"".join(encode_message_parts(msg))


def decode_message(
    data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_SIZE
) -> Message:
    """Decode one message; raises only ProtocolError subclasses.

    UnknownMessageType carries the request id when the message had one, so the
    receiver can answer that request with an Error.
    """
    value = unpack(data, max_size=max_size)
    if not isinstance(value, dict):
        raise DecodeError(f"a message must be a map, got {type(value).__name__}")
    type_name = value.get("t")
    if not isinstance(type_name, str):
        raise DecodeError("a message needs a string field 't' naming its type")
    spec = _REGISTRY.get(type_name)
    if spec is None:
        rid = value.get("request_id")
        raise UnknownMessageType(type_name, rid if type(rid) is int else None)
    kwargs: dict[str, Any] = {}
    for name, check, exact, required in spec.fields:
        if name not in value:
            if required:
                raise DecodeError(f"message {type_name!r} lacks field {name!r}")
            continue
        item = value[name]
        if exact is not None:
            if type(item) is not exact:
                raise DecodeError(
                    f"message {type_name!r} field {name!r}: expected {exact.__name__}, "
                    f"got {type(item).__name__}"
                )
        elif check is not None:
            try:
                item = check(item)
            except TypeError as exc:
                raise DecodeError(f"message {type_name!r} field {name!r}: {exc}") from None
        kwargs[name] = item
    return spec.cls(**kwargs)
