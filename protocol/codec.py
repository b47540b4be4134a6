"""msgpack encoding of wire values, with one extension type for numpy arrays.

A tensor travels as msgpack ext type 1 whose data is a small header followed by
the raw little-endian element bytes::

    u8 len(dtype name) | dtype name (ascii) | u8 ndim | ndim x u64 LE dims | zero pad to 16 | raw

The header is padded to a multiple of 16 bytes so the elements are 16-byte
aligned inside the ext data (msgpack hands the ext data to us as a fresh
``bytes`` object, whose payload is 16-byte aligned), which lets the decoder wrap
them with ``np.frombuffer`` without a copy and without an unaligned array.

Large arrays are never copied on the way out: :func:`pack_parts` returns the
encoding as a list of buffers in which each large array appears as a memoryview
of its own memory, ready for ``writelines``. :func:`pack` joins them.

Limits are checked before anything is allocated: the whole input is bounded by
``max_size`` and every declared length inside it by the input length, a
tensor's declared shape must match its byte count exactly, and only the dtypes
in :data:`ALLOWED_DTYPES` are accepted (never ``object``). Decoding errors are
always :class:`~protocol.errors.DecodeError` or :class:`~protocol.errors.FrameTooLarge`.

Work is bounded too, not only bytes: a frame of nested empty arrays is a few
bytes per Python object, so every decode counts the containers (arrays and maps)
it builds and stops at ``max_containers``; frames above :data:`CONTROL_MAX` are
"bulk" frames, which must carry their bytes in a few bin or ext (tensor) fields,
and get tighter container and length limits (:data:`BULK_LIMITS`).

Conventions: tuples decode as lists; map keys must be ``str`` or ``bytes``
(integer keys would make hash-flooding cheap); numpy scalars travel as 0-d
arrays (except ``np.float64``, a ``float`` subclass, which travels as a float);
decoded arrays are read-only views of the received bytes.
"""

from __future__ import annotations

import functools
import struct
import sys
import threading
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

from protocol.errors import DecodeError, EncodeError, FrameTooLarge, ProtocolError

__all__ = [
    "ALLOWED_DTYPES",
    "CONTROL_MAX",
    "DEFAULT_MAX_SIZE",
    "TENSOR_EXT",
    "pack",
    "pack_parts",
    "unpack",
]

TENSOR_EXT = 1
DEFAULT_MAX_SIZE = 64 * 2**20
# Frames up to this size are control messages; larger ones must be bulk-shaped.
CONTROL_MAX = 2**20
# Containers one control frame may hold: 8k, where 1 MiB of empty arrays would
# otherwise become a million Python lists (measured: 16 MiB of them decoded to
# 1.2 GB and held the event loop for 7 s).
MAX_CONTROL_CONTAINERS = 8192
MAX_CONTROL_ITEMS = 65536
# Bulk frames: a handful of containers and short lists around big bin/ext fields.
BULK_LIMITS = {"containers": 256, "items": 1024, "str": 64 * 1024}
MAX_NDIM = 32
# Arrays up to this size are copied into the msgpack buffer (cheaper than a
# separate buffer per array); larger ones are referenced, not copied.
INLINE_TENSOR_BYTES = 64 * 1024
_ALIGN = 16
_EXT32 = struct.Struct(">BIb")

_DTYPE_LIST: tuple[np.dtype[Any], ...] = (
    np.dtype(np.bool_),
    np.dtype(np.int8),
    np.dtype(np.int16),
    np.dtype(np.int32),
    np.dtype(np.int64),
    np.dtype(np.uint8),
    np.dtype(np.uint16),
    np.dtype(np.uint32),
    np.dtype(np.uint64),
    np.dtype(np.float16),
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.complex64),
    np.dtype(np.complex128),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(ml_dtypes.float8_e4m3fn),
    np.dtype(ml_dtypes.float8_e5m2),
)


def _wire_dtype(dt: np.dtype[Any]) -> np.dtype[Any]:
    return dt if sys.byteorder == "little" else dt.newbyteorder("<")


#: dtype name on the wire -> the little-endian numpy dtype it decodes to.
ALLOWED_DTYPES: dict[str, np.dtype[Any]] = {dt.name: _wire_dtype(dt) for dt in _DTYPE_LIST}


# dtype.name is slow (microseconds); a dict keyed by dtype is not.
_NAME_OF: dict[np.dtype[Any], str] = {dt: name for name, dt in ALLOWED_DTYPES.items()}
_DIMS = [struct.Struct(f"<{n}Q") for n in range(MAX_NDIM + 1)]


class _LargeTensor(Exception):
    """Raised inside msgpack's ``default`` hook to leave the fast path."""


def _as_wire_array(obj: np.ndarray[Any, Any] | np.generic) -> tuple[np.ndarray[Any, Any], str]:
    arr = obj if type(obj) is np.ndarray else np.asarray(obj)
    name = _NAME_OF.get(arr.dtype)
    if name is None:
        name = arr.dtype.name
        wire = ALLOWED_DTYPES.get(name)
        if wire is None:
            raise EncodeError(
                f"numpy dtype {arr.dtype} cannot be sent; allowed dtypes: {', '.join(ALLOWED_DTYPES)}"
            )
        arr = arr.astype(wire)  # e.g. big-endian input: swap to the wire byte order
    if arr.ndim > MAX_NDIM:
        raise EncodeError(f"an array with {arr.ndim} dimensions cannot be sent (max {MAX_NDIM})")
    # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
    return (arr if arr.flags.c_contiguous else arr.copy(order="C")), name


@functools.lru_cache(maxsize=1024)
def _tensor_header(name: str, shape: tuple[int, ...]) -> bytes:
    raw = name.encode("ascii")
    head = bytes([len(raw)]) + raw + bytes([len(shape)]) + _DIMS[len(shape)].pack(*shape)
    return head + b"\0" * (-len(head) % _ALIGN)


def _byte_view(arr: np.ndarray[Any, Any]) -> memoryview:
    # A uint8 view works for every dtype, including ml_dtypes ones that the
    # buffer protocol cannot describe.
    return arr.reshape(-1).view(np.uint8).data


def _default(obj: Any) -> Any:
    if type(obj) is np.ndarray or isinstance(obj, np.ndarray | np.generic):
        arr, name = _as_wire_array(obj)
        if arr.nbytes > INLINE_TENSOR_BYTES:
            raise _LargeTensor
        # tuple.__new__ skips ExtType's argument checks (ours are always valid).
        return tuple.__new__(msgpack.ExtType, (TENSOR_EXT, _tensor_header(name, arr.shape) + arr.tobytes()))
    raise EncodeError(
        f"values of type {type(obj).__name__} cannot be sent; use None, bool, int, float, str, "
        "bytes, lists, str-keyed dicts and numpy arrays"
    )


_local = threading.local()


def _packer() -> msgpack.Packer:
    # One packer per thread: creating one per message costs more than packing a small message.
    packer: msgpack.Packer | None = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(default=_default, use_bin_type=True)
    return packer


class _Parts:
    """Collects small encoded pieces into one buffer and keeps large arrays separate."""

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self._small = bytearray()

    def small(self, data: bytes) -> None:
        self._small += data

    def large(self, view: memoryview) -> None:
        if self._small:
            self.parts.append(bytes(self._small))
            self._small = bytearray()
        self.parts.append(view)

    def finish(self) -> list[bytes | memoryview]:
        if self._small or not self.parts:
            self.parts.append(bytes(self._small))
        return self.parts


def _walk(obj: Any, packer: msgpack.Packer, out: _Parts) -> None:
    """Encode ``obj`` piecewise; only containers that hold a large array get here."""
    if isinstance(obj, np.ndarray | np.generic):
        arr, name = _as_wire_array(obj)
        header = _tensor_header(name, arr.shape)
        out.small(_EXT32.pack(0xC9, len(header) + arr.nbytes, TENSOR_EXT) + header)
        out.large(_byte_view(arr))
        return
    if isinstance(obj, dict):
        out.small(packer.pack_map_header(len(obj)))
        items: list[Any] = [x for kv in obj.items() for x in kv]
    elif isinstance(obj, list | tuple):
        out.small(packer.pack_array_header(len(obj)))
        items = list(obj)
    else:
        out.small(packer.pack(obj))
        return
    for item in items:
        try:
            out.small(packer.pack(item))
        except _LargeTensor:
            _walk(item, packer, out)


def pack_parts(obj: Any) -> list[bytes | memoryview]:
    """Encode ``obj``; large arrays appear as views of their own memory (no copy).

    The views stay valid as long as the arrays are alive and unmodified; write
    them out (e.g. ``transport.writelines``) before changing the arrays.
    """
    packer = _packer()
    try:
        return [packer.pack(obj)]
    except _LargeTensor:
        pass
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode value: {exc}") from None
    out = _Parts()
    try:
        _walk(obj, packer, out)
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode value: {exc}") from None
    return out.finish()


def pack(obj: Any) -> bytes:
    """Encode ``obj`` as one ``bytes`` object."""
    parts = pack_parts(obj)
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    return b"".join(parts)


def _ext_hook(code: int, data: bytes) -> Any:
    if code != TENSOR_EXT:
        raise DecodeError(f"unknown msgpack extension type {code}")
    size = len(data)
    if size < 2:
        raise DecodeError("tensor header is truncated")
    name_len = data[0]
    if not 1 <= name_len <= 32 or size < name_len + 2:
        raise DecodeError("tensor header has a bad dtype name length")
    ndim = data[1 + name_len]
    if ndim > MAX_NDIM:
        raise DecodeError(f"tensor has {ndim} dimensions (max {MAX_NDIM})")
    head_len = 2 + name_len + 8 * ndim
    head_len += -head_len % _ALIGN
    if size < head_len:
        raise DecodeError("tensor header is truncated")
    dtype, shape, count, nbytes = _header_meta(data[:head_len])
    if nbytes != size - head_len:
        raise DecodeError(
            f"tensor shape {shape} of {dtype.name} needs {nbytes} bytes but {size - head_len} were sent"
        )
    arr: np.ndarray[Any, Any] = np.frombuffer(data, dtype=dtype, count=count, offset=head_len)
    return arr.reshape(shape)


@functools.lru_cache(maxsize=1024)
def _header_meta(head: bytes) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    """dtype, shape, element count and byte count from a tensor header (already length-checked)."""
    name_len = head[0]
    try:
        name = head[1 : 1 + name_len].decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError("tensor dtype name is not ascii") from None
    dtype = ALLOWED_DTYPES.get(name)
    if dtype is None:
        raise DecodeError(f"tensor dtype {name!r} is not allowed")
    ndim = head[1 + name_len]
    shape = _DIMS[ndim].unpack_from(head, 2 + name_len)
    count = 1
    for dim in shape:
        count *= dim  # Python ints: a huge declared shape cannot overflow
    return dtype, shape, count, count * dtype.itemsize


class _ContainerBudget:
    """msgpack list/object hook that refuses a value once it has built too many containers."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def __call__(self, value: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise DecodeError("too many arrays and maps in one message (a bulk message carries its "
                              "data in bin or tensor fields)")
        return value


def unpack(data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_SIZE) -> Any:
    """Decode one msgpack value; raises only ProtocolError subclasses."""
    size = len(data) if type(data) is not memoryview else data.nbytes
    if size > max_size:
        raise FrameTooLarge(size, max_size, "message")
    if size > CONTROL_MAX:
        containers, items, max_str = BULK_LIMITS["containers"], BULK_LIMITS["items"], BULK_LIMITS["str"]
    else:
        containers, items, max_str = MAX_CONTROL_CONTAINERS, MAX_CONTROL_ITEMS, size
    budget = _ContainerBudget(containers)
    try:
        return msgpack.unpackb(
            data,
            ext_hook=_ext_hook,
            list_hook=budget,
            object_hook=budget,
            raw=False,
            use_list=True,
            strict_map_key=True,
            # Each element takes at least one byte, so nothing declared inside
            # the input can legitimately be longer than the input itself.
            max_str_len=min(size, max_str),
            max_bin_len=size,
            max_array_len=min(size, items),
            max_map_len=min(size // 2, items),
            max_ext_len=size,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types; all mean "bad input"
        raise DecodeError(f"not a valid msgpack value ({type(exc).__name__}: {exc})") from None
