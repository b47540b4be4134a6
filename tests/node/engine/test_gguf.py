"""The engine reading GGUF files: the same logits as from the safetensors the GGUF was made
from (F32 exactly, F16 within its rounding), and for quantized types exactly those of the
same weights dequantized by the gguf package; whole and split; llama.cpp's Q/K permutation
undone; Llama 3 rope factors from rope_freqs.weight; a type it cannot read refused by name."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from node.engine import PartitionSpec, WeightSource, load_chain, load_config, parse_config  # noqa: E402
from node.engine.errors import WeightsError  # noqa: E402
from node.engine.model import load_partition  # noqa: E402
from node.gguf.config import hf_config  # noqa: E402
from node.gguf.files import read_header  # noqa: E402
from node.testing.gguf_writer import _permute, write_gguf  # noqa: E402
from node.testing.tinymodel import make_tiny_model  # noqa: E402

IDS = [3, 17, 42, 99, 7, 250, 11, 5]


def _gguf_config(path: Path):  # type: ignore[no-untyped-def]
    header = read_header(path)
    names = {t.name: t for t in header.tensors}
    factors = None
    if "rope_freqs.weight" in names:
        t = names["rope_freqs.weight"]
        with path.open("rb") as fh:
            fh.seek(t.offset)
            factors = list(struct.unpack(f"<{t.shape[0]}f", fh.read(t.length)))
    return parse_config(hf_config(header.metadata, tied="output.weight" not in names, rope_factors=factors))


def _logits(source: WeightSource, config, spec=None, kernel: str = "jax") -> np.ndarray:  # type: ignore[no-untyped-def]
    """All positions' logits; a GGUF's blocks kept and decoded by `kernel` (blocks.py):
    "jax" computes with exactly the dequantized values, as "dequantize" does."""
    part = load_partition(source, config, spec or PartitionSpec.whole(config), max_context=64, prefill_chunk=16,
                          block_kernel=kernel)
    _, out = part.prefill(part.new_cache(1), IDS, all_logits=True)
    return np.asarray(out)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", arch=request.param, layers=3)


def test_f32_and_f16_match_the_safetensors(tiny: Path, tmp_path: Path) -> None:
    config = load_config(tiny)
    want = _logits(WeightSource.from_dir(tiny), config)
    for qtype, tol in (("F32", 1e-5), ("F16", 2e-2)):
        path = write_gguf(tiny, tmp_path / f"m-{qtype}.gguf", qtype=qtype)
        gcfg = _gguf_config(path)
        assert gcfg.num_layers == config.num_layers and gcfg.rope_scaling is None
        assert gcfg.inv_freq() == pytest.approx(config.inv_freq(), rel=1e-6)  # llama3 rope via factors
        got = _logits(WeightSource.from_gguf(path), gcfg)
        np.testing.assert_allclose(got, want, atol=tol, rtol=0)


def _dequantized_twin(tiny: Path, path: Path, out: Path) -> Path:
    """A safetensors copy of ``tiny`` whose weights are the GGUF's, dequantized by the gguf
    package and un-permuted by the test's own arithmetic (the reference for quantized types)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(tiny, out)
    cfg = json.loads((tiny / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    weights = load_file(str(next(tiny.glob("*.safetensors"))))
    from node.testing.gguf_writer import _gguf_name

    for name in weights:
        t = by_name[_gguf_name(name)]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weights[name].shape).astype(np.float32)
        if cfg["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if "q_proj" in name else kv
            # Invert the permutation by applying it to an index and reading back.
            index = _permute(np.arange(w.shape[0]), n)
            w = w[np.argsort(index)]
        weights[name] = w
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file(weights, str(out / "model.safetensors"))
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("kernel", ["jax", "dequantize"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_types_equal_the_gguf_package_dequantized(tiny: Path, tmp_path: Path, qtype: str,
                                                            kernel: str) -> None:
    """Blocks kept (decoded inside the step) or dequantized at load: the same logits as the
    weights dequantized by the gguf package into a safetensors twin."""
    path = write_gguf(tiny, tmp_path / f"m-{qtype}.gguf", qtype=qtype)
    twin = _dequantized_twin(tiny, path, tmp_path / "twin")
    config = load_config(twin)
    want = _logits(WeightSource.from_dir(twin), config)
    got = _logits(WeightSource.from_gguf(path), _gguf_config(path), kernel=kernel)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # And the quantization itself is not a no-op: the originals differ.
    assert np.abs(_logits(WeightSource.from_dir(tiny), load_config(tiny)) - got).max() > 1e-4


def test_split_equals_whole(tiny: Path, tmp_path: Path) -> None:
    path = write_gguf(tiny, tmp_path / "m.gguf", qtype="Q8_0")
    config = _gguf_config(path)
    whole = _logits(WeightSource.from_gguf(path), config)
    specs = [PartitionSpec(0, 1, True, False), PartitionSpec(1, 3, False, True)]
    chain = load_chain(WeightSource.from_gguf(path), config, specs, max_context=64, prefill_chunk=16,
                       block_kernel="jax")
    _, out = chain.prefill(chain.new_caches(1), IDS, all_logits=True)
    np.testing.assert_allclose(np.asarray(out), whole, atol=1e-5, rtol=0)
    # The middle partition read only its own tensors.
    source = WeightSource.from_gguf(path)
    load_partition(source, config, PartitionSpec(1, 2, False, False), max_context=64, prefill_chunk=16)
    assert source.tensors_read and all(".layers.1." in n for n in source.tensors_read)


def test_k_quant_blocks_dequantize_like_the_gguf_package(tiny: Path, tmp_path: Path) -> None:
    """Q4_K / Q5_K / Q6_K: the numpy quantizers cannot write them, so the test writes raw
    random blocks (finite scales) and checks the engine's tensor equals gguf's dequantize."""
    from node.engine.gguf import decode
    from protocol.safetensors import TensorInfo

    rng = np.random.default_rng(1)
    for qtype in ("Q4_K", "Q5_K", "Q6_K"):
        qt = gguf.GGMLQuantizationType[qtype]
        block, size = gguf.constants.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (4, 2 * size), dtype=np.uint8)
        # Keep the f16 scales small and finite: overwrite them with 0.01.
        scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        for r in range(4):
            for b in range(2):
                at = b * size + (size - 2 if qtype == "Q6_K" else 0)
                raw[r, at : at + 2] = scale
                if qtype != "Q6_K":
                    raw[r, at + 2 : at + 4] = scale
        info = TensorInfo("w", "f", qtype, (4, 2 * block), 0, raw.nbytes)
        got = decode(info, raw.tobytes())
        want = gguf.quants.dequantize(raw, qt)
        assert got.shape == (4, 2 * block) and np.isfinite(got).all()
        np.testing.assert_array_equal(got, want.reshape(4, 2 * block))


def test_unsupported_type_is_refused_by_name(tiny: Path, tmp_path: Path) -> None:
    path = write_gguf(tiny, tmp_path / "m.gguf", qtype="MXFP4")
    with pytest.raises(WeightsError, match=r"MXFP4.*cannot dequantize"):
        _logits(WeightSource.from_gguf(path), _gguf_config(path))


def test_truncated_gguf_is_refused(tiny: Path, tmp_path: Path) -> None:
    path = write_gguf(tiny, tmp_path / "m.gguf", qtype="F32")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="past the end"):
        WeightSource.from_gguf(path)


def test_a_middle_partition_reads_only_its_header_and_its_own_tensors(tiny: Path, tmp_path: Path) -> None:
    """A node serving middle layers holds the header's pieces and its own tensors' pieces, and
    nothing else: the header parser must not read ahead past the header's end (it once read
    1 MiB chunks that ran into the embedding table's first piece)."""
    from node.engine.weights import local_read_into, local_reader

    path = write_gguf(tiny, tmp_path / "m.gguf", qtype="Q8_0")
    header = read_header(path)
    config = _gguf_config(path)
    spec = PartitionSpec(1, 2, False, False)
    own = [(t.offset, t.offset + t.length) for t in header.tensors if ".1." in t.name]
    allowed = [(0, header.data_start), *own]
    read = local_reader(path.parent, [path.name])

    def guarded(file_name: str, offset: int, length: int) -> bytes:
        if not any(a <= offset and offset + length <= b for a, b in allowed):
            raise AssertionError(f"read of [{offset}, {offset + length}) outside what the node holds")
        return read(file_name, offset, length)

    size = path.stat().st_size
    with pytest.raises(AssertionError, match="outside what the node holds"):  # the old way: no header bound
        WeightSource(guarded, [path.name], sizes={path.name: size})
    source = WeightSource(guarded, [path.name], sizes={path.name: size}, headers={path.name: header.data_start},
                          read_into=local_read_into(path.parent, [path.name]))
    load_partition(source, config, spec, max_context=64, prefill_chunk=16)
    assert source.tensors_read and all(".layers.1." in n for n in source.tensors_read)
