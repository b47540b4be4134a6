"""protocol/gguf.py: the header parser against the gguf package's own writer and reader,
and every way a hostile or broken file is refused before anything large is allocated."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from protocol.gguf import GGML_TYPES, GGUFArray, GGUFError, hf_name, parse_gguf, tensor_bytes  # noqa: E402


def _reader(data: bytes):  # type: ignore[no-untyped-def]
    return lambda off, n: data[off : off + n]


def _write(path: Path, qtype: str = "Q8_0") -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("general.name", "tiny ñ")
    w.add_token_list(["a", "b", "<s>"])
    w.add_array("some.ints", [1, 2, 3])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    rng = np.random.default_rng(0)
    m = rng.standard_normal((8, 64)).astype(np.float32)
    qt = gguf.GGMLQuantizationType[qtype]
    q = gguf.quants.quantize(m, qt)
    w.add_tensor("blk.0.attn_q.weight", q, raw_shape=q.shape, raw_dtype=qt)
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_parses_what_the_gguf_package_writes(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf")
    data = path.read_bytes()
    header = parse_gguf(_reader(data), len(data), "m.gguf")
    md = header.metadata
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 2
    assert md["llama.attention.layer_norm_rms_epsilon"] == 1e-5  # float32 read back as written
    assert md["general.name"] == "tiny ñ" and md["some.ints"] == [1, 2, 3]
    assert md["tokenizer.ggml.tokens"] == ["a", "b", "<s>"] and md["tokenizer.ggml.add_bos_token"] is True
    theirs = {t.name: (int(t.data_offset), int(t.n_bytes), tuple(int(x) for x in reversed(t.shape)),
                       t.tensor_type.name) for t in gguf.GGUFReader(str(path)).tensors}
    mine = {t.name: (t.offset, t.length, t.shape, t.dtype) for t in header.tensors}
    assert mine == theirs
    assert mine["blk.0.attn_q.weight"][2] == (8, 64)  # numpy order: [out, in]
    assert header.data_start % header.alignment == 0


def test_type_table_matches_the_gguf_package() -> None:
    for type_id, (name, block, size) in GGML_TYPES.items():
        qt = gguf.GGMLQuantizationType(type_id)
        assert qt.name == name
        assert gguf.constants.GGML_QUANT_SIZES[qt] == (block, size)
    assert tensor_bytes("Q4_K", (3, 512)) == 3 * 2 * 144
    with pytest.raises(GGUFError, match="whole blocks"):
        tensor_bytes("Q4_K", (3, 100))
    with pytest.raises(GGUFError, match="unknown ggml type"):
        tensor_bytes("Q9_9", (1,))


def test_hf_names() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None and hf_name("blk.x.attn_q.weight") is None


def _header(n_tensors: int = 0, n_kv: int = 0, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _tensor(name: bytes, dims: tuple[int, ...], kind: int, offset: int) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", kind, offset)


@pytest.mark.parametrize(("data", "message"), [
    (b"GGML" + bytes(20), "not a GGUF file"),
    (_header(version=1), "version 1"),
    (_header(n_tensors=1 << 40), "implausible"),
    (_header(n_kv=1) + struct.pack("<Q", 1 << 40), "at most"),  # a key of a terabyte
    (_header(n_kv=1) + _s(b"k") + struct.pack("<I", 99), "unknown value type"),
    (_header(n_kv=1) + _s(b"k") + struct.pack("<IIQ", 9, 4, 1 << 40), "at most"),  # huge array
    (_header(n_kv=2) + (_s(b"k") + struct.pack("<IB", 0, 1)) * 2, "twice"),
    (_header(n_tensors=1) + _tensor(b"t", (4,) * 5, 0, 0), "dimensions"),
    (_header(n_tensors=1) + _tensor(b"t", (4,), 77, 0), "unknown ggml type"),
    (_header(n_tensors=1) + _tensor(b"t", (4,), 0, 3), "not aligned"),
    (_header(n_tensors=1) + _tensor(b"t", (0,), 0, 0), "implausible dimensions"),
    (_header(n_tensors=1) + _tensor(b"t", (100,), 12, 0), "whole blocks"),
    (_header(n_tensors=1) + _tensor(b"t", (1 << 20,), 0, 0), "past the end"),
    (_header(n_tensors=2) + _tensor(b"a", (64,), 0, 0) + _tensor(b"b", (64,), 0, 128), "overlap"),
    (_header(n_tensors=2) + _tensor(b"a", (8,), 0, 0) + _tensor(b"a", (8,), 0, 32), "twice"),
    (_header(n_kv=1)[:-3], "past the end"),  # truncated
])
def test_broken_and_hostile_headers_are_refused(data: bytes, message: str) -> None:
    padded = data + bytes(512)
    size = len(padded) if message != "past the end" else len(data) + (512 if b"t" in data else 0)
    with pytest.raises(GGUFError, match=message):
        parse_gguf(_reader(padded[:size]), size, "x.gguf")


def test_header_cap_holds_without_a_size() -> None:
    # A reader that does not know the file's size: a header can still not grow unbounded.
    asked: list[int] = []

    def endless(offset: int, length: int) -> bytes:
        asked.append(length)
        return bytes(length)

    data = _header(n_kv=1) + _s(b"k") + struct.pack("<IIQ", 9, 8, 1 << 20)  # a million strings
    with pytest.raises(GGUFError, match="over 4194304 bytes"):
        parse_gguf(lambda off, n: (data + bytes(n))[off : off + n] if off < len(data) else endless(off, n),
                   None, "x.gguf", max_header_bytes=4 * 2**20)
    assert sum(asked) <= 4 * 2**20


# --- bounded in memory and in time (a member of the cluster may publish a hostile file) ----------


def _kv(key: bytes, kind: int, value: bytes) -> bytes:
    return _s(key) + struct.pack("<I", kind) + value


def _array(item: int, count: int, items: bytes) -> bytes:
    return struct.pack("<IQ", item, count) + items


def _peak(fn):  # type: ignore[no-untyped-def]
    """fn's result and the most memory it held at once, as tracemalloc counts it."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_arrays_are_held_in_about_twice_the_header_bytes() -> None:
    # 1M floats and 200k short strings: as Python lists 32 MB and 12 MB for a 4 MB header.
    floats = struct.pack("<1048576f", *range(1 << 20))
    tokens = [f"t{i}".encode() for i in range(200_000)]
    data = _header(n_kv=3) + _kv(b"f", 9, _array(6, 1 << 20, floats)) + \
        _kv(b"s", 9, _array(8, len(tokens), b"".join(_s(t) for t in tokens))) + \
        _kv(b"b", 9, _array(7, 3, b"\x01\x00\x01"))
    header, peak = _peak(lambda: parse_gguf(_reader(data), len(data), "x.gguf"))
    assert peak < 2.2 * len(data)
    md = header.metadata
    floats_, strings, bools = md["f"], md["s"], md["b"]
    assert isinstance(floats_, GGUFArray) and floats_.item_type is float and len(floats_) == 1 << 20
    assert floats_[0] == 0.0 and floats_[-1] == (1 << 20) - 1 and floats_[2:4] == [2.0, 3.0]
    assert strings.item_type is str and strings[199_999] == "t199999" and strings[-2] == "t199998"
    assert list(strings)[:3] == ["t0", "t1", "t2"] and strings.tolist()[-1] == "t199999"
    assert bools == [True, False, True] and bools.item_type is bool and [True, False, True] == bools
    assert "200000" in repr(strings) and len(repr(strings)) < 100
    with pytest.raises(IndexError):
        strings[200_000]


def test_arrays_of_arrays_decode_and_nest_at_most_max_depth() -> None:
    inner = _array(8, 2, _s(b"x") + _s(b"\xff")) + _array(4, 1, struct.pack("<I", 7)) + _array(0, 0, b"")
    data = _header(n_kv=1) + _kv(b"n", 9, _array(9, 3, inner))
    md = parse_gguf(_reader(data), len(data), "x.gguf").metadata
    assert md["n"].item_type is GGUFArray and md["n"] == [["x", "\ufffd"], [7], []]
    assert md["n"][1].item_type is int and md["n"][-1].tolist() == []
    deeper = _header(n_kv=1) + _kv(b"n", 9, _array(9, 1, _array(9, 1, _array(0, 0, b""))))
    with pytest.raises(GGUFError, match="nests arrays more than 2 deep"):
        parse_gguf(_reader(deeper), len(deeper), "x.gguf")
    parse_gguf(_reader(deeper), len(deeper), "x.gguf", max_depth=3)


def test_empty_nested_arrays_count_against_the_item_cap() -> None:
    # 12 bytes an item: 64 MiB of them were 5.6M Python lists (388 MB) and 14 s of parsing.
    n = 400_000
    data = _header(n_kv=1) + _kv(b"n", 9, _array(9, n, _array(0, 0, b"") * n))
    with pytest.raises(GGUFError, match=f"at most {n - 1} metadata values"):
        parse_gguf(_reader(data), len(data), "x.gguf", max_items=n - 1)
    # Inner arrays' items count too.
    data2 = _header(n_kv=1) + _kv(b"n", 9, _array(9, 2, _array(0, 5, bytes(5)) * 2))
    with pytest.raises(GGUFError, match="at most 10 metadata values"):
        parse_gguf(_reader(data2), len(data2), "x.gguf", max_items=10)
    header, peak = _peak(lambda: parse_gguf(_reader(data), len(data), "x.gguf"))
    assert len(header.metadata["n"]) == n and header.metadata["n"][n - 1] == []
    assert peak < 2.2 * len(data)


def test_a_header_over_the_cap_is_refused_before_it_is_read_whole() -> None:
    tokens = _array(8, 1 << 18, _s(b"abcdefgh") * (1 << 18))  # 4 MiB of strings
    data = _header(n_kv=1) + _kv(b"tokenizer.ggml.tokens", 9, tokens) + bytes(64)
    read_up_to = 0

    def read(off: int, n: int) -> bytes:
        nonlocal read_up_to
        read_up_to = max(read_up_to, off + n)
        return data[off : off + n]

    with pytest.raises(GGUFError, match="over 1048576 bytes"):
        parse_gguf(read, len(data), "x.gguf", max_header_bytes=2**20)
    assert read_up_to <= 2**20
    # A count that cannot fit in what is left is refused without reading on.
    read_up_to = 0
    huge = _header(n_kv=1) + _kv(b"f", 9, _array(6, 1 << 30, b"")) + bytes(64)
    with pytest.raises(GGUFError, match="over 1048576 bytes"):
        parse_gguf(lambda off, n: read(off, n) and huge[off : off + n], None, "x.gguf",
                   max_header_bytes=2**20, max_items=1 << 31)
    assert read_up_to <= 2**20
    assert len(parse_gguf(_reader(data), len(data), "x.gguf").metadata["tokenizer.ggml.tokens"]) == 1 << 18
