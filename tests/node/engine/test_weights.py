"""Weight loading: files vs byte-range callback, sharded checkpoints, only-what-you-need,
and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from node.engine import (
    MissingTensorError,
    ModelConfigError,
    PartitionError,
    PartitionSpec,
    ShapeMismatchError,
    WeightsError,
    WeightSource,
    load_config,
    load_partition,
    memory_estimate,
    partition_param_count,
    split_layers,
)
from node.engine.cache import cache_nbytes
from node.engine.weights import (
    local_read_into,
    local_reader,
    model_files,
    partition_tensor_names,
)

TinyModel = Any  # see conftest.py


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sharded")
    tiny_llama.hf.save_pretrained(path, safe_serialization=True, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


def _assert_same_params(a: Any, b: Any) -> None:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_callback_loading_equals_file_loading(tiny_llama: TinyModel, sharded_llama: Path) -> None:
    cfg = tiny_llama.config
    spec = PartitionSpec.whole(cfg)
    from_dir = load_partition(WeightSource.from_dir(tiny_llama.path), cfg, spec, max_context=64)
    assert len(model_files(sharded_llama)) > 1
    calls: list[tuple[str, int, int]] = []
    reader = local_reader(sharded_llama)

    def read_range(file_name: str, offset: int, length: int) -> bytes:
        calls.append((file_name, offset, length))
        return reader(file_name, offset, length)

    source = WeightSource.from_reader(read_range, model_files(sharded_llama))
    from_cb = load_partition(source, cfg, spec, max_context=64)
    _assert_same_params(from_dir.params, from_cb.params)
    assert {c[0] for c in calls} == set(model_files(sharded_llama))


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_partition_reads_only_its_tensors(
    which: str, tiny_llama: TinyModel, tiny_qwen: TinyModel
) -> None:
    tiny = tiny_llama if which == "llama" else tiny_qwen
    cfg = tiny.config
    for spec in [PartitionSpec(1, 2, False, False), *split_layers(cfg.num_layers, 2)]:
        source = tiny.source()
        load_partition(source, cfg, spec, max_context=32)
        read = set(source.tensors_read)
        assert read == set(partition_tensor_names(cfg, spec))
        layers = {int(n.split(".")[2]) for n in read if n.startswith("model.layers.")}
        assert layers == set(range(spec.start, spec.end))
        assert ("model.embed_tokens.weight" in read) == (
            spec.has_embedding or (spec.has_head and cfg.tie_word_embeddings)
        )
        assert ("lm_head.weight" in read) == (spec.has_head and not cfg.tie_word_embeddings)


def test_tied_tail_uses_embedding_as_head(tiny_qwen: TinyModel) -> None:
    cfg = tiny_qwen.config
    assert cfg.tie_word_embeddings
    tail = load_partition(
        tiny_qwen.source(), cfg, PartitionSpec(cfg.num_layers, cfg.num_layers, False, True)
    )
    embed = tiny_qwen.hf.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(tail.params.head), embed)  # [vocab, hidden], as stored
    assert tail.params.embed is None
    # The partition holding both uses the one table for both.
    whole = load_partition(tiny_qwen.source(), cfg, PartitionSpec.whole(cfg))
    assert whole.params.head is None
    np.testing.assert_array_equal(np.asarray(whole.params.embed), embed)


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_loaded_arrays_are_the_files_arrays(
    which: str, tiny_llama: TinyModel, tiny_qwen: TinyModel
) -> None:
    # Stored as the file stores them ([out, in]), never transposed or fused on the host.
    tiny = tiny_llama if which == "llama" else tiny_qwen
    cfg = tiny.config
    spec = PartitionSpec.whole(cfg)
    part = load_partition(tiny.source(), cfg, spec, dtype="float32")
    file = load_file(tiny.path / "model.safetensors")
    names = {
        "ln1": "input_layernorm.weight",
        "wq": "self_attn.q_proj.weight",
        "wk": "self_attn.k_proj.weight",
        "wv": "self_attn.v_proj.weight",
        "bq": "self_attn.q_proj.bias",
        "bk": "self_attn.k_proj.bias",
        "bv": "self_attn.v_proj.bias",
        "wo": "self_attn.o_proj.weight",
        "ln2": "post_attention_layernorm.weight",
        "wg": "mlp.gate_proj.weight",
        "wu": "mlp.up_proj.weight",
        "wd": "mlp.down_proj.weight",
    }
    for i, layer in enumerate(part.params.layers):
        for field, name in names.items():
            value = getattr(layer, field)
            key = f"model.layers.{i}.{name}"
            if value is None:
                assert key not in file
                continue
            assert value.shape == file[key].shape, key
            np.testing.assert_array_equal(np.asarray(value), file[key])
    np.testing.assert_array_equal(np.asarray(part.params.embed), file["model.embed_tokens.weight"])
    if not cfg.tie_word_embeddings:
        np.testing.assert_array_equal(np.asarray(part.params.head), file["lm_head.weight"])


@pytest.mark.parametrize("which", ["llama", "qwen"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_accounting_matches_allocation(
    which: str, dtype: str, tiny_llama: TinyModel, tiny_qwen: TinyModel
) -> None:
    # Weights and cache are counted exactly, for every kind of partition (temporaries and
    # the whole peak: test_memory.py).
    tiny = tiny_llama if which == "llama" else tiny_qwen
    cfg = tiny.config
    specs = [
        PartitionSpec.whole(cfg),
        *split_layers(cfg.num_layers, 3),
        PartitionSpec(1, 2, False, False),
    ]
    for spec in specs:
        part = load_partition(tiny.source(), cfg, spec, dtype=dtype, max_context=48)
        cache = part.new_cache(3)
        weights = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(part.params))
        assert partition_param_count(cfg, spec) * jnp.dtype(dtype).itemsize == weights, spec
        assert (
            cache_nbytes(cfg, part.lengths, 3, jnp.dtype(dtype).itemsize)
            == cache.nbytes
        )
    spec = specs[1]
    est = memory_estimate(
        cfg, spec.start, spec.end, spec.has_embedding, spec.has_head, dtype, 48, 3
    )
    part = load_partition(tiny.source(), cfg, spec, dtype=dtype, max_context=48)
    assert est.weights == sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(part.params))
    assert est.kv_cache == part.new_cache(3).nbytes
    assert est.temporaries > 0


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_reported(tiny_llama: TinyModel, tmp_path: Path) -> None:
    path = _copy_model(tiny_llama.path, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    cfg = load_config(path)
    # A partition that does not need the tensor still loads.
    load_partition(WeightSource.from_dir(path), cfg, PartitionSpec(0, 1, True, False))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_partition(WeightSource.from_dir(path), cfg, PartitionSpec.whole(cfg))


def test_shape_mismatch_is_reported(tiny_llama: TinyModel, tmp_path: Path) -> None:
    path = _copy_model(tiny_llama.path, tmp_path / "m")
    raw = json.loads((path / "config.json").read_text())
    raw["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(raw))
    cfg = load_config(path)
    with pytest.raises(ShapeMismatchError, match=r"gate_proj\.weight.*\[128, 64\].*\[96, 64\]"):
        load_partition(WeightSource.from_dir(path), cfg, PartitionSpec.whole(cfg))


def test_malformed_safetensors_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(WeightsError, match="not valid JSON"):
        WeightSource.from_dir(tmp_path)
    bad.write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(WeightsError, match="implausible"):
        WeightSource.from_dir(tmp_path)
    bad.unlink()
    with pytest.raises(WeightsError, match=r"no \*\.safetensors"):
        WeightSource.from_dir(tmp_path)


def test_truncated_file_is_reported(tiny_llama: TinyModel, tmp_path: Path) -> None:
    path = _copy_model(tiny_llama.path, tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg = load_config(path)
    with pytest.raises(WeightsError, match="truncated"):
        load_partition(WeightSource.from_dir(path), cfg, PartitionSpec.whole(cfg))


def test_bad_partition_arguments(tiny_llama: TinyModel) -> None:
    cfg = tiny_llama.config
    with pytest.raises(PartitionError, match="outside the model"):
        load_partition(tiny_llama.source(), cfg, PartitionSpec(2, 9, False, True))
    with pytest.raises(PartitionError, match="power of two"):
        load_partition(tiny_llama.source(), cfg, PartitionSpec.whole(cfg), prefill_chunk=100)
    with pytest.raises(ModelConfigError, match="not supported"):
        load_partition(tiny_llama.source(), cfg, PartitionSpec.whole(cfg), dtype="int8")
    with pytest.raises(PartitionError, match="cannot split"):
        split_layers(cfg.num_layers, cfg.num_layers + 1)


@pytest.mark.parametrize("make", [local_reader, local_read_into])
def test_local_readers_serve_only_the_models_weight_files(
    make: Any, tiny_llama: TinyModel, tmp_path: Path
) -> None:
    """Readers back piece serving to peers: no path outside the model's weight files."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama.path, model_dir)
    (tmp_path / "cluster.secret").write_text("do not serve me\n")
    (model_dir / "notes.txt").write_text("not a weight file\n")
    (model_dir / "link.safetensors").symlink_to(tmp_path / "cluster.secret")
    name = model_files(tiny_llama.path)[0]
    size = (model_dir / name).stat().st_size
    listed = make(model_dir, [name, "link.safetensors"])

    def call(file_name: str, offset: int, length: int, read: Any = listed) -> bytes:
        if make is local_reader:
            return bytes(read(file_name, offset, length))
        buf = bytearray(length)
        read(file_name, offset, memoryview(buf))
        return bytes(buf)

    assert call(name, 0, 8) == (model_dir / name).read_bytes()[:8]
    for bad in ["../cluster.secret", "/etc/passwd", "notes.txt", f"./{name}/.."]:
        with pytest.raises(WeightsError, match="not one of this model's weight files"):
            call(bad, 0, 4)
    with pytest.raises(WeightsError, match="outside the model directory"):
        call("link.safetensors", 0, 4)
    with pytest.raises(WeightsError, match="truncated"):
        call(name, size - 4, 8)
    with pytest.raises(WeightsError, match="bad byte range"):
        call(name, -1, 4)
    # By default the files are the model's own: the index or its *.safetensors.
    with pytest.raises(WeightsError, match="not one of"):
        call("../cluster.secret", 0, 4, make(model_dir))
