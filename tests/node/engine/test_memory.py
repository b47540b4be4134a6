"""Memory the planner trusts: predicted against measured on CPU (weights and cache as
allocated, XLA's temporaries of the real compiled steps, the host peak while loading),
and the GPU allocator settings the daemon applies."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from node.engine import (
    PartitionSpec,
    SamplerState,
    SamplingParams,
    WeightSource,
    configure_memory,
    load_config,
    load_partition,
    memory_estimate,
    memory_needed,
)
from node.engine.backend import memory_fraction
from node.engine.buckets import decode_width
from node.engine.sampling import row_settings
from node.engine.steps import OUT_HIDDEN, OUT_LAST, forward, tail
from node.engine.weights import local_reader, model_files
from node.testing.tinymodel import make_tiny_model

ROOT = Path(__file__).resolve().parents[3]
CHUNK, SLOTS, BLOCK = 64, 4, 32


def _measured(part: Any, load_peak: int) -> tuple[int, int]:
    """(total, temporaries): allocated weights and cache, XLA's temporaries of the steps
    this partition compiles, and the traced host peak while loading."""
    cache = part.new_cache(SLOTS)
    w = decode_width(SLOTS)
    ids = part.spec.has_embedding
    cfg = part.config
    x_pre = (
        np.zeros((1, CHUNK), np.int32) if ids else np.zeros((1, CHUNK, cfg.hidden_size), np.float32)
    )
    x_dec = np.zeros((w, 1), np.int32) if ids else np.zeros((w, 1, cfg.hidden_size), np.float32)
    i32 = np.zeros(1, np.int32)
    iw = np.zeros(w, np.int32)
    out = OUT_LAST if part.spec.has_head else OUT_HIDDEN
    key = part.geom.length
    compiled = [
        forward.lower(
            part.params, cache, x_pre, i32, i32, i32, shape=part.shape, key_len=key, out=out
        ),
        forward.lower(
            part.params, cache, x_dec, iw, iw, iw, shape=part.shape, key_len=key, out=out
        ),
    ]
    if part.spec.has_head:
        states = [SamplerState(SamplingParams(temperature=0.8, top_k=40), cfg.vocab_size)] * w
        rows = row_settings(states, cfg.vocab_size)
        compiled.append(
            tail.lower(
                part.params,
                cache,
                x_dec,
                iw,
                iw,
                rows,
                shape=part.shape,
                key_len=key,
                candidates=64,
                top_n=0,
            )
        )
    temps = max(c.compile().memory_analysis().temp_size_in_bytes for c in compiled)
    weights = sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(part.params))
    return weights + max(load_peak, cache.nbytes + temps), temps


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Two shapes: untied llama (hidden 64, 5 layers) and tied qwen2 (hidden 128, 4 layers,
    # a larger vocabulary): enough layers that the per-layer extrapolation is exercised.
    if request.param == "llama":
        kw: dict[str, Any] = {"layers": 5, "hidden": 64, "intermediate": 192, "vocab_size": 512}
    else:
        kw = {
            "layers": 4,
            "hidden": 128,
            "heads": 8,
            "kv_heads": 2,
            "intermediate": 256,
            "vocab_size": 2048,
        }
    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param, **kw)


@pytest.mark.parametrize("context", [256, 1024])
def test_predicted_peak_is_within_ten_percent_of_measured(model_dir: Path, context: int) -> None:
    cfg = load_config(model_dir)
    n = cfg.num_layers
    for spec in (
        PartitionSpec.whole(cfg),
        PartitionSpec(1, n - 1, False, False),
        PartitionSpec(n - 2, n, False, True),
    ):

        def load(spec: PartitionSpec = spec) -> Any:
            return load_partition(
                WeightSource.from_dir(model_dir),
                cfg,
                spec,
                dtype="float32",
                max_context=context,
                prefill_chunk=CHUNK,
                attn_block=BLOCK,
            )

        load()  # once untraced: first-use allocations inside JAX are not the load's
        tracemalloc.start()
        part = load()
        # What is still traced afterwards is what JAX adopted without a copy (aligned
        # reads on CPU): those bytes are the weights, not a transient.
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        load_peak = peak - kept
        measured, measured_temps = _measured(part, load_peak)
        est = memory_estimate(
            cfg,
            spec.start,
            spec.end,
            spec.has_embedding,
            spec.has_head,
            "float32",
            context,
            SLOTS,
            prefill_chunk=CHUNK,
            attn_block=BLOCK,
            platform="cpu",
            zero_copy_load=True,
        )
        assert est.total == memory_needed(
            cfg,
            spec.start,
            spec.end,
            spec.has_embedding,
            spec.has_head,
            "float32",
            context,
            SLOTS,
            prefill_chunk=CHUNK,
            attn_block=BLOCK,
            platform="cpu",
            zero_copy_load=True,
        )
        assert abs(est.total - measured) <= 0.1 * measured, (spec, context, est, measured)
        # Each part on its own, so that the total cannot hide a wrong one.
        assert est.kv_cache == part.new_cache(SLOTS).nbytes
        assert abs(est.temporaries - measured_temps) <= 0.1 * measured_temps, (
            spec,
            est,
            measured_temps,
        )
        # Local files are read into aligned buffers JAX adopts (counted as no transient);
        # through a bytes callback (the piece store) at most one tensor is in flight.
        bytes_est = memory_estimate(
            cfg,
            spec.start,
            spec.end,
            spec.has_embedding,
            spec.has_head,
            "float32",
            context,
            SLOTS,
            prefill_chunk=CHUNK,
            attn_block=BLOCK,
            platform="cpu",
        )
        assert est.load_transient == 0 and load_peak <= bytes_est.load_transient + 64 * 1024
        tracemalloc.start()
        source = WeightSource.from_reader(local_reader(model_dir), model_files(model_dir))
        load_partition(
            source,
            cfg,
            spec,
            dtype="float32",
            max_context=context,
            prefill_chunk=CHUNK,
            attn_block=BLOCK,
        )
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak - kept <= bytes_est.load_transient + 64 * 1024, (spec, bytes_est, peak - kept)


def test_gpu_estimate_adds_the_runtime_reserve(model_dir: Path) -> None:
    cfg = load_config(model_dir)
    args = (cfg, 0, cfg.num_layers, True, True, "float32", 256, SLOTS)
    cpu = memory_estimate(*args, prefill_chunk=CHUNK, attn_block=BLOCK, platform="cpu")
    gpu = memory_estimate(*args, prefill_chunk=CHUNK, attn_block=BLOCK, platform="gpu")
    assert gpu.total == cpu.weights + cpu.kv_cache + cpu.temporaries + gpu.runtime_reserve
    assert gpu.runtime_reserve > 0 and cpu.runtime_reserve == 0


@pytest.mark.parametrize(
    ("max_bytes", "total", "want"),
    [
        (16 << 30, 80 << 30, (16 * 1024 - 512) / (80 * 1024)),
        (80 << 30, 80 << 30, 0.95),  # never all of it
        (600 << 20, 80 << 30, 0.01),  # floor
    ],
)
def test_memory_fraction(max_bytes: int, total: int, want: float) -> None:
    assert memory_fraction(max_bytes, total) == pytest.approx(want)


def test_memory_fraction_refuses_less_than_the_runtime_reserve() -> None:
    with pytest.raises(ValueError, match="lend more memory"):
        memory_fraction(256 << 20, 80 << 30)


def test_configure_memory_sets_the_allocator_before_jax_starts() -> None:
    code = (
        "import json, os\n"
        "from node.engine import configure_memory\n"
        "setup = configure_memory(16 << 30, gpu_total=80 << 30)\n"
        "none = configure_memory(None, gpu_total=80 << 30)\n"
        "print(json.dumps([setup.fraction, os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'],\n"
        "                  os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'], none.fraction]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    fraction, env_fraction, prealloc, none = json.loads(out.stdout)
    assert fraction == pytest.approx(0.1938, abs=1e-4) and env_fraction == "0.1938"
    assert prealloc == "false" and none is None


def test_configure_memory_after_jax_started_is_refused() -> None:
    assert jax.devices()  # the test process's backend is up
    with pytest.raises(RuntimeError, match="before JAX starts"):
        configure_memory(1 << 30, gpu_total=80 << 30)
