"""Tensor-aware msgpack codec: round trips, zero copy, limits, clear errors."""

from __future__ import annotations

import struct
from typing import Any

import ml_dtypes
import msgpack
import numpy as np
import pytest

from protocol.codec import (
    ALLOWED_DTYPES,
    INLINE_TENSOR_BYTES,
    TENSOR_EXT,
    pack,
    pack_parts,
    unpack,
)
from protocol.errors import DecodeError, EncodeError, FrameTooLarge


def _sample(dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(0)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("name", sorted(ALLOWED_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 4)])
def test_round_trip_every_dtype_and_shape(name: str, shape: tuple[int, ...]) -> None:
    arr = _sample(ALLOWED_DTYPES[name], shape)
    out = unpack(pack(arr))
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()


def test_bfloat16_is_named_on_the_wire() -> None:
    arr = np.arange(6, dtype=ml_dtypes.bfloat16).reshape(2, 3)
    data = pack(arr)
    assert b"bfloat16" in data
    out = unpack(data)
    assert out.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(out.astype(np.float32), arr.astype(np.float32))


def test_nested_structures_round_trip() -> None:
    big = np.arange(INLINE_TENSOR_BYTES, dtype=np.float32).reshape(-1, 64)  # > inline limit
    value: dict[str, Any] = {
        "a": [1, -2, 3.5, None, True, "text", b"raw"],
        "b": {"x": np.ones(3, np.int8), "deep": [{"y": big}, [big[:2].copy()]]},
        "c": {},
        "d": [],
    }
    out = unpack(pack(value))
    assert out["a"] == value["a"]
    np.testing.assert_array_equal(out["b"]["x"], value["b"]["x"])
    np.testing.assert_array_equal(out["b"]["deep"][0]["y"], big)
    np.testing.assert_array_equal(out["b"]["deep"][1][0], big[:2])
    assert out["c"] == {} and out["d"] == []


def test_tuples_decode_as_lists() -> None:
    assert unpack(pack((1, (2, 3)))) == [1, [2, 3]]


def test_large_arrays_are_referenced_not_copied_on_pack() -> None:
    big = np.zeros((512, 512), np.float32)
    parts = pack_parts({"t": big})
    views = [p for p in parts if isinstance(p, memoryview)]
    assert len(views) == 1
    assert np.shares_memory(np.frombuffer(views[0], np.uint8), big)
    # the pieces concatenated are the same bytes pack() produces
    assert b"".join(parts) == pack({"t": big})


def test_unpack_is_zero_copy_over_the_ext_data() -> None:
    big = np.arange(100_000, dtype=np.float32)
    out = unpack(pack(big))
    base = out
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, bytes)  # np.frombuffer over msgpack's ext bytes
    assert out.ctypes.data % 16 == 0  # aligned
    assert not out.flags.writeable


def test_non_contiguous_and_big_endian_arrays_are_normalised() -> None:
    arr = np.arange(12, dtype=">i4").reshape(3, 4).T
    out = unpack(pack(arr))
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == np.dtype("<i4")


def test_numpy_scalars_travel_as_0d_arrays() -> None:
    out = unpack(pack(np.int32(7)))
    assert isinstance(out, np.ndarray) and out.shape == () and out.dtype == np.int32
    assert int(out) == 7


@pytest.mark.parametrize(
    "value",
    [np.array([object()], dtype=object), np.array(["s"]), {1, 2}, object(), np.zeros(1, "M8[s]")],
)
def test_unsupported_values_raise_encode_error(value: Any) -> None:
    with pytest.raises(EncodeError) as err:
        pack(value)
    assert "cannot" in str(err.value)


def _ext(header: bytes, raw: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(TENSOR_EXT, header + raw))


def _header(name: bytes, shape: tuple[int, ...]) -> bytes:
    head = bytes([len(name)]) + name + bytes([len(shape)]) + struct.pack(f"<{len(shape)}Q", *shape)
    return head + b"\0" * (-len(head) % 16)


def test_shape_disagreeing_with_byte_count_is_rejected() -> None:
    with pytest.raises(DecodeError, match="needs 16 bytes"):
        unpack(_ext(_header(b"float32", (4,)), b"\0" * 12))


def test_huge_declared_shape_is_rejected_without_allocating() -> None:
    with pytest.raises(DecodeError):
        unpack(_ext(_header(b"float64", (2**40, 2**40)), b"\0" * 8))


@pytest.mark.parametrize("name", [b"object", b"O", b"<U1", b"V8", b"float128", b"\xff"])
def test_dtypes_outside_the_whitelist_are_rejected(name: bytes) -> None:
    with pytest.raises(DecodeError):
        unpack(_ext(_header(name, (1,)), b"\0" * 8))


def test_unknown_extension_type_is_rejected() -> None:
    with pytest.raises(DecodeError, match="extension type 7"):
        unpack(msgpack.packb(msgpack.ExtType(7, b"abc")))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used byte
        b"\x92\x01",  # array of 2 with 1 element
        b"\xdd\xff\xff\xff\xff",  # array announcing 4 G elements
        b"\xdf\xff\xff\xff\xff",  # map announcing 4 G pairs
        b"\xdb\xff\xff\xff\xff",  # str announcing 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin announcing 4 GiB
        b"\xc9\xff\xff\xff\xff\x01",  # ext announcing 4 GiB
        b"\xa2\xff\xfe",  # invalid utf-8
        b"\x81\x01\x02",  # int map key
        b"\x81\x90\x02",  # unhashable map key
        b"\x01\x02",  # extra data
        b"\x91" * 5000,  # nesting too deep
    ],
)
def test_malformed_input_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        unpack(data)


def test_input_over_max_size_is_refused_before_decoding() -> None:
    with pytest.raises(FrameTooLarge):
        unpack(pack(b"x" * 100), max_size=50)
