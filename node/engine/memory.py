"""Memory the planner can trust: what a partition needs to load and serve.

`memory_estimate` returns the parts, `memory_needed` their total:
- weights, exactly as weights.load_params allocates them (tied-head rule included);
- the KV cache, exactly as cache.new_cache allocates it (CacheGeometry: a ring for a
  sliding window, lengths rounded to whole attention blocks);
- temporaries of the compiled steps at the configured prefill chunk and slot count: the
  largest of the prefill chunk, the decode step at the slots' width and the tail step
  with sampling. These come from XLA itself (`compiled.memory_analysis()`), compiled
  ahead of time on abstract shapes (nothing allocated) for two and three layers and
  extrapolated linearly: XLA CPU's scheduler keeps about one [hidden, rows] buffer per
  layer alive, so temporaries grow by a fixed amount per layer (measured on the
  Qwen2.5-0.5B shape, 512-token chunk: 23.6, 25.6, 29.4, 37.0 MB for 1, 2, 4, 8 layers).
  A hand formula missed by up to 67% across shapes (XLA's buffer reuse is not a sum of
  tensors); compiling the proxies takes a few seconds per model shape and is cached.
  On CPU a bf16 model's temporaries include an f32 copy of its matrices: XLA CPU
  upcasts bf16 dots;
- the host bytes in flight while loading: at most one tensor's bytes as read (two when
  the file's dtype differs from the compute dtype, since the conversion runs on the
  device); an upper bound, as JAX on CPU adopts an aligned read without copying;
- on GPU, the runtime's reserve outside JAX's pool (backend.GPU_RUNTIME_RESERVE).

Before this, the estimate counted weights and cache only: a 512-token prefill at
context 4096 needed 194 MiB of temporaries against 13.4 MiB predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp

from node.engine.backend import GPU_RUNTIME_RESERVE
from node.engine.buckets import decode_width
from node.engine.cache import CacheGeometry, KVCache, cache_nbytes, default_attn_block
from node.engine.config import SUPPORTED_DTYPES, ModelConfig
from node.engine.samplers import DEFAULT_CANDIDATES, RowSettings
from node.engine.steps import OUT_HIDDEN, OUT_LAST, StepShape, forward, tail
from node.engine.weights import LayerParams, PartitionParams, PartitionSpec, head_shares_embedding

DEFAULT_PREFILL_CHUNK = 512


def partition_param_count(config: ModelConfig, spec: PartitionSpec) -> int:
    """Number of parameters a partition holds, in the engine's layout."""
    H, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Q, KV = config.q_size, config.kv_size
    per_layer = 2 * H + H * (Q + 2 * KV) + Q * H + 3 * H * F
    if config.qkv_bias:
        per_layer += Q + 2 * KV
    if config.o_bias:
        per_layer += H
    count = (spec.end - spec.start) * per_layer
    if spec.has_embedding:
        count += V * H
    if spec.has_head:
        count += H
        if not head_shares_embedding(config, spec):
            count += V * H
    return count


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one partition needs, by part; `total` is what the planner compares.

    On CPU the device is the host: the load transient and the serving temporaries never
    coexist (the cache is allocated after loading), so total = weights + the larger of
    (load_transient, kv_cache + temporaries). On GPU, total is device memory (weights,
    cache, temporaries, runtime reserve); load_transient is host memory.
    """

    weights: int
    kv_cache: int
    temporaries: int
    load_transient: int
    runtime_reserve: int
    platform: str

    @property
    def total(self) -> int:
        if self.platform == "cpu":
            return self.weights + max(self.load_transient, self.kv_cache + self.temporaries)
        return self.weights + self.kv_cache + self.temporaries + self.runtime_reserve


def _abstract_params(
    config: ModelConfig, spec: PartitionSpec, layers: int, dtype: str
) -> PartitionParams:
    H, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Q, KV = config.q_size, config.kv_size
    dt = jnp.dtype(dtype)

    def a(*shape: int) -> Any:
        return jax.ShapeDtypeStruct(shape, dt)

    def b(*shape: int) -> Any:
        return a(*shape) if config.qkv_bias else None

    layer = LayerParams(
        a(H),
        a(Q, H),
        a(KV, H),
        a(KV, H),
        b(Q),
        b(KV),
        b(KV),
        a(H, Q),
        a(H) if config.o_bias else None,
        a(H),
        a(F, H),
        a(F, H),
        a(H, F),
    )
    head = None
    if spec.has_head and not head_shares_embedding(config, spec):
        head = a(V, H)
    return PartitionParams(
        a(V, H) if spec.has_embedding else None,
        tuple(layer for _ in range(layers)),
        a(H) if spec.has_head else None,
        head,
    )


@lru_cache(maxsize=64)
def _step_temporaries(
    config: ModelConfig,
    has_embedding: bool,
    has_head: bool,
    layers: int,
    dtype: str,
    geom: CacheGeometry,
    prefill_chunk: int,
    slots: int,
) -> tuple[int, ...]:
    """temp_size_in_bytes of each step (prefill chunk, decode, tail) for `layers` layers."""
    spec = PartitionSpec(0, layers, has_embedding, has_head)
    params = _abstract_params(config, spec, layers, dtype)
    shape = StepShape(config, geom, has_embedding, has_head)
    cache_shape = (slots, config.num_kv_heads, geom.length, config.head_dim)
    kv: Any = jax.ShapeDtypeStruct(cache_shape, jnp.dtype(dtype))
    cache = KVCache([kv] * layers, [kv] * layers, slots)
    width = decode_width(slots)

    def i32(*s: int) -> Any:
        return jax.ShapeDtypeStruct(s, jnp.int32)

    def inputs(rows: int, n: int) -> Any:
        if has_embedding:
            return i32(rows, n)
        return jax.ShapeDtypeStruct((rows, n, config.hidden_size), jnp.dtype(dtype))

    out = OUT_LAST if has_head else OUT_HIDDEN
    key_len = geom.length
    lowered = [
        forward.lower(
            params,
            cache,
            inputs(1, prefill_chunk),
            i32(1),
            i32(1),
            i32(1),
            shape=shape,
            key_len=key_len,
            out=out,
        ),
        forward.lower(
            params,
            cache,
            inputs(width, 1),
            i32(width),
            i32(width),
            i32(width),
            shape=shape,
            key_len=key_len,
            out=out,
        ),
    ]
    if has_head:
        vocab = config.vocab_size

        def arr(dt: Any, *s: int) -> Any:
            return jax.ShapeDtypeStruct(s, dt)

        f32, u32 = jnp.float32, jnp.uint32
        settings = RowSettings(
            arr(f32, width),
            i32(width),
            arr(f32, width),
            arr(f32, width),
            arr(f32, width),
            arr(jnp.bool_, width, vocab),
            arr(u32, width),
            arr(u32, width),
        )
        lowered.append(
            tail.lower(
                params,
                cache,
                inputs(width, 1),
                i32(width),
                i32(width),
                settings,
                shape=shape,
                key_len=key_len,
                candidates=DEFAULT_CANDIDATES,
                top_n=0,
            )
        )
    sizes = []
    for low in lowered:
        analysis = low.compile().memory_analysis()
        sizes.append(int(analysis.temp_size_in_bytes) if analysis is not None else 0)
    return tuple(sizes)


def step_temporaries(
    config: ModelConfig,
    spec: PartitionSpec,
    dtype: str,
    geom: CacheGeometry,
    prefill_chunk: int,
    slots: int,
) -> int:
    """Temporaries of the partition's largest compiled step, on this machine's backend:
    measured on two- and three-layer proxies and extrapolated per layer."""
    layers = spec.end - spec.start
    args = (config, spec.has_embedding, spec.has_head)
    # No temporary scales with the cache length (keys are walked block by block), so the
    # proxies use the shortest cache of this geometry: one compilation serves every context.
    proxy = CacheGeometry(2 * geom.block, 2 * geom.block, geom.block, geom.ring, geom.window)
    rest = (dtype, proxy, prefill_chunk, slots)
    if layers <= 3:
        return max(_step_temporaries(*args, layers, *rest))
    two = _step_temporaries(*args, 2, *rest)
    three = _step_temporaries(*args, 3, *rest)
    return max(c + (layers - 3) * max(0, c - b) for b, c in zip(two, three, strict=True))


def _largest_tensor(config: ModelConfig, spec: PartitionSpec) -> int:
    H, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    elems = [H]
    if spec.end > spec.start:
        elems += [F * H, config.q_size * H]
    if spec.has_embedding or spec.has_head:
        elems.append(V * H)
    return max(elems)


def _geometry(
    config: ModelConfig, context: int, prefill_chunk: int, attn_block: int | None, platform: str
) -> CacheGeometry:
    context = min(context, config.max_position_embeddings)
    return CacheGeometry.plan(config, context, prefill_chunk, attn_block or default_attn_block(platform))


def resident_bytes(
    config: ModelConfig,
    spec: PartitionSpec,
    dtype: str,
    context: int,
    batch: int,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> int:
    """Weights plus KV cache of a partition, without compiling anything: a floor of
    memory_needed, cheap enough to check a plan a peer sent before loading it."""
    spec.validate(config)
    itemsize = jnp.dtype(dtype).itemsize
    geom = _geometry(config, context, prefill_chunk, None, jax.default_backend())
    weights = partition_param_count(config, spec) * itemsize
    return weights + cache_nbytes(config, spec.end - spec.start, batch, geom.length, itemsize)


def memory_estimate(
    config: ModelConfig,
    start: int,
    end: int,
    has_embedding: bool,
    has_head: bool,
    dtype: str,
    context: int,
    batch: int,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    attn_block: int | None = None,
    platform: str | None = None,
    zero_copy_load: bool = False,
) -> MemoryEstimate:
    """The parts of what a partition of layers [start, end) needs with a cache of `batch`
    sessions of `context` tokens in `dtype` (see the module docstring). platform: "cpu"
    or an accelerator's ("gpu"); default: this machine's. Temporaries are measured with
    this machine's compiler (a few seconds the first time per model shape).
    zero_copy_load: the weights come from local files (WeightSource.from_dir), which
    JAX on CPU adopts without a copy: no load transient unless the dtype is converted."""
    spec = PartitionSpec(start, end, has_embedding, has_head)
    spec.validate(config)
    platform = platform or jax.default_backend()
    itemsize = jnp.dtype(dtype).itemsize
    geom = _geometry(config, context, prefill_chunk, attn_block, platform)
    stored = config.torch_dtype if config.torch_dtype in SUPPORTED_DTYPES else dtype
    file_itemsize = jnp.dtype(stored).itemsize
    converting = jnp.dtype(stored) != jnp.dtype(dtype)
    copies = (2 if converting else 1) - (1 if zero_copy_load and platform == "cpu" else 0)
    load = _largest_tensor(config, spec) * file_itemsize * copies
    return MemoryEstimate(
        weights=partition_param_count(config, spec) * itemsize,
        kv_cache=cache_nbytes(config, end - start, batch, geom.length, itemsize),
        temporaries=step_temporaries(config, spec, dtype, geom, prefill_chunk, batch),
        load_transient=load,
        runtime_reserve=0 if platform == "cpu" else GPU_RUNTIME_RESERVE,
        platform=platform,
    )


def memory_needed(
    config: ModelConfig,
    start: int,
    end: int,
    has_embedding: bool,
    has_head: bool,
    dtype: str,
    context: int,
    batch: int,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    attn_block: int | None = None,
    platform: str | None = None,
    zero_copy_load: bool = False,
) -> int:
    """Bytes a partition needs to load and serve: memory_estimate(...).total."""
    return memory_estimate(
        config,
        start,
        end,
        has_embedding,
        has_head,
        dtype,
        context,
        batch,
        prefill_chunk=prefill_chunk,
        attn_block=attn_block,
        platform=platform,
        zero_copy_load=zero_copy_load,
    ).total
