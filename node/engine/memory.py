"""Memory the planner can trust: what a partition needs to load and serve.

`memory_estimate` returns the parts, `memory_needed` their total:
- weights, exactly as weights.load_params allocates them (tied-head rule included): the
  compute dtype's bytes, or with weights="int8" one byte per matrix entry plus a float32
  scale per matrix row, norms and biases in the compute dtype (Qwen2.5-0.5B shape:
  0.25x the f32 bytes);
- the KV cache, exactly as cache.new_cache allocates it (CacheGeometry: a ring for a
  sliding window, lengths rounded to whole attention blocks) in its own dtype (kv_dtype,
  "auto" resolved as load_partition does: config.resolve_kv_dtype);
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
  the file's dtype differs from the compute dtype or the weights are quantized, since
  the conversion runs on the device, plus quantize's 16 MB block); an upper bound, as
  JAX on CPU adopts an aligned read without copying;
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
from node.engine.blocks import BLOCK_TYPES
from node.engine.buckets import decode_width
from node.engine.cache import (
    CacheGeometry,
    KVCache,
    cache_nbytes,
    default_attn_block,
    layer_geometries,
    layer_lengths,
)
from node.engine.config import SUPPORTED_DTYPES, ModelConfig, resolve_kv_dtype
from node.engine.moe import MoEParams
from node.engine.quant import (
    BLOCK_ENTRIES,
    NATIVE,
    QuantMatrix,
    check_weights,
    default_kernel,
    quantized_bytes,
)
from node.engine.samplers import DEFAULT_CANDIDATES, RowSettings, mask_words
from node.engine.steps import OUT_HIDDEN, OUT_LAST, StepShape, forward, tail
from node.engine.weights import LayerParams, PartitionParams, PartitionSpec, head_shares_embedding

DEFAULT_PREFILL_CHUNK = 512


def _mlp_params(config: ModelConfig, layer: int, active: bool = False) -> int:
    """A layer's MLP parameters: every expert and the router in a sparse layer (all of
    them live on the node), or with `active` only the k experts a token runs."""
    H = config.hidden_size
    if not config.is_sparse(layer):
        return 3 * H * config.intermediate_size
    experts = config.num_experts_per_tok if active else config.num_experts
    return config.num_experts * H + experts * 3 * H * config.moe_intermediate_size


def _layer_params(config: ModelConfig, layer: int, active: bool = False) -> int:
    H, Q, KV = config.hidden_size, config.q_size, config.kv_size
    count = 2 * H + H * (Q + 2 * KV) + Q * H + _mlp_params(config, layer, active)
    if config.qk_norm:
        count += 2 * config.head_dim
    if config.sandwich_norms:
        count += 2 * H
    if config.qkv_bias:
        count += Q + 2 * KV
    if config.o_bias:
        count += H
    return count


def partition_param_count(config: ModelConfig, spec: PartitionSpec, *, active: bool = False) -> int:
    """Number of parameters a partition holds, in the engine's layout; with `active`,
    those one token's step multiplies (a sparse layer's k chosen experts, not all E:
    the compute figure of a mixture-of-experts model)."""
    V, H = config.vocab_size, config.hidden_size
    count = sum(_layer_params(config, i, active) for i in range(spec.start, spec.end))
    if spec.has_embedding:
        count += V * H
    if spec.has_head:
        count += H
        if not head_shares_embedding(config, spec):
            count += V * H
    return count


def _matrix_shapes(config: ModelConfig, spec: PartitionSpec) -> list[tuple[int, int]]:
    """[out, in] of every matrix a partition holds (what weights="int8" quantizes)."""
    H, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Q, KV = config.q_size, config.kv_size
    E, FE = config.num_experts, config.moe_intermediate_size
    shapes: list[tuple[int, int]] = []
    for i in range(spec.start, spec.end):
        shapes += [(Q, H), (KV, H), (KV, H), (H, Q)]
        # int8 experts: one scale per expert and row, as [E * rows, cols]; the router stays.
        shapes += [(E * FE, H), (E * FE, H), (E * H, FE)] if config.is_sparse(i) else [
            (F, H), (F, H), (H, F)]
    if spec.has_embedding:
        shapes.append((V, H))
    if spec.has_head and not head_shares_embedding(config, spec):
        shapes.append((V, H))
    return shapes


def _named_matrices(config: ModelConfig, spec: PartitionSpec) -> list[tuple[str, int, int]]:
    """(checkpoint name, rows, cols) of the matrices a partition reads (a GGUF's stacked
    experts under their stacked tensor's name)."""
    H, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Q, KV = config.q_size, config.kv_size
    out: list[tuple[str, int, int]] = []
    for i in range(spec.start, spec.end):
        p = f"model.layers.{i}."
        if config.fused:
            out += [(p + "self_attn.qkv_proj.weight", Q + 2 * KV, H), (p + "mlp.gate_up_proj.weight", 2 * F, H)]
        else:
            out += [(p + f"self_attn.{x}_proj.weight", r, H) for x, r in (("q", Q), ("k", KV), ("v", KV))]
        out.append((p + "self_attn.o_proj.weight", H, Q))
        if config.is_sparse(i):  # stacked experts, as one [E * rows, cols] matrix each
            E, FE = config.num_experts, config.moe_intermediate_size
            out += [(p + "mlp.experts.gate_proj", E * FE, H), (p + "mlp.experts.up_proj", E * FE, H),
                    (p + "mlp.experts.down_proj", E * H, FE)]
        else:
            if not config.fused:
                out += [(p + "mlp.gate_proj.weight", F, H), (p + "mlp.up_proj.weight", F, H)]
            out.append((p + "mlp.down_proj.weight", H, F))
    if spec.has_embedding:
        out.append(("model.embed_tokens.weight", V, H))
    if spec.has_head and not head_shares_embedding(config, spec):
        out.append(("model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight", V, H))
    return out


def partition_weight_bytes(
    config: ModelConfig, spec: PartitionSpec, dtype: str, weights: str = NATIVE,
    platform: str | None = None,
) -> int:
    """Bytes of a partition's weights as load_params allocates them, in `dtype`, or with
    weights="int8" the matrices as int8 plus a float32 scale per row. A GGUF's block
    matrices (config.matrix_types) count at their blocks' size on CPU, where they are
    kept so (blocks.py)."""
    itemsize = jnp.dtype(dtype).itemsize
    count = partition_param_count(config, spec)
    if check_weights(weights) == NATIVE:
        total = count * itemsize
        if config.matrix_types and (platform or jax.default_backend()) == "cpu":
            types = dict(config.matrix_types)
            for name, rows, cols in _named_matrices(config, spec):
                t = BLOCK_TYPES.get(types.get(name, ""))
                if t is not None and cols % t.block_size == 0:
                    total += t.row_bytes(cols) * rows - rows * cols * itemsize
        return total
    shapes = _matrix_shapes(config, spec)
    rest = count - sum(r * c for r, c in shapes)
    return sum(quantized_bytes(r, c) for r, c in shapes) + rest * itemsize


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
    config: ModelConfig, spec: PartitionSpec, layers: int, dtype: str, weights: str = NATIVE
) -> PartitionParams:
    H, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Q, KV = config.q_size, config.kv_size
    dt = jnp.dtype(dtype)
    kernel = default_kernel()

    def a(*shape: int) -> Any:
        return jax.ShapeDtypeStruct(shape, dt)

    def m(rows: int, cols: int) -> Any:
        if weights == NATIVE:
            return a(rows, cols)
        q: Any = jax.ShapeDtypeStruct((rows, cols), jnp.int8)
        scale: Any = jax.ShapeDtypeStruct((rows,), jnp.float32)
        return QuantMatrix(q, scale, str(dt), kernel)

    def b(*shape: int) -> Any:
        return a(*shape) if config.qkv_bias else None

    D = config.head_dim

    def experts(rows: int, cols: int) -> Any:
        E = config.num_experts
        if weights == NATIVE:
            return a(E, rows, cols)
        q: Any = jax.ShapeDtypeStruct((E, rows, cols), jnp.int8)
        scale: Any = jax.ShapeDtypeStruct((E, rows), jnp.float32)
        return QuantMatrix(q, scale, str(dt), kernel)

    def layer(i: int) -> LayerParams:
        sparse = config.is_sparse(i)
        FE = config.moe_intermediate_size
        moe = MoEParams(a(config.num_experts, H), experts(FE, H), experts(FE, H), experts(H, FE))
        return LayerParams(
            a(H),
            m(Q, H),
            m(KV, H),
            m(KV, H),
            b(Q),
            b(KV),
            b(KV),
            m(H, Q),
            a(H) if config.o_bias else None,
            a(H),
            None if sparse else m(F, H),
            None if sparse else m(F, H),
            None if sparse else m(H, F),
            q_norm=a(D) if config.qk_norm else None,
            k_norm=a(D) if config.qk_norm else None,
            ln_pre_mlp=a(H) if config.sandwich_norms else None,
            ln_post_mlp=a(H) if config.sandwich_norms else None,
            moe=moe if sparse else None,
        )

    head = None
    if spec.has_head and not head_shares_embedding(config, spec):
        head = m(V, H)
    return PartitionParams(
        m(V, H) if spec.has_embedding else None,
        tuple(layer(spec.start + i) for i in range(layers)),
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
    weights: str = NATIVE,
    kv_dtype: str | None = None,
) -> tuple[int, ...]:
    """temp_size_in_bytes of each step (prefill chunk, decode, tail) for `layers` layers."""
    spec = PartitionSpec(0, layers, has_embedding, has_head)
    params = _abstract_params(config, spec, layers, dtype, weights)
    shape = StepShape(config, geom, has_embedding, has_head)
    cache_shape = (slots, config.num_kv_heads, geom.length, config.head_dim)
    kv: Any = jax.ShapeDtypeStruct(cache_shape, jnp.dtype(resolve_kv_dtype(kv_dtype, dtype)))
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
            arr(jnp.int32, width, mask_words(vocab)),
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
    weights: str = NATIVE,
    kv_dtype: str | None = None,
) -> int:
    """Temporaries of the partition's largest compiled step, on this machine's backend:
    measured on two- and three-layer proxies and extrapolated per layer."""
    layers = spec.end - spec.start
    args = (config, spec.has_embedding, spec.has_head)
    # No temporary scales with the cache length (keys are walked block by block), so the
    # proxies use the shortest cache of this geometry: one compilation serves every context.
    proxy = CacheGeometry(2 * geom.block, 2 * geom.block, geom.block, geom.ring, geom.window)
    rest = (dtype, proxy, prefill_chunk, slots, weights, resolve_kv_dtype(kv_dtype, dtype))
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
    if any(config.is_sparse(i) for i in range(spec.start, spec.end)):
        # The stacked experts of one matrix, plus the last expert read before stacking.
        elems.append((config.num_experts + 1) * config.moe_intermediate_size * H)
    if spec.has_embedding or spec.has_head:
        elems.append(V * H)
    return max(elems)


def _geometry(config: ModelConfig, context: int, attn_block: int | None, platform: str) -> CacheGeometry:
    context = min(context, config.max_position_embeddings)
    return CacheGeometry.plan(context, attn_block or default_attn_block(platform))


def _cache_lengths(
    config: ModelConfig, spec: PartitionSpec, geom: CacheGeometry, prefill_chunk: int
) -> list[int]:
    """Rows per slot of each layer's cache, as the Partition allocates them."""
    local, sliding = layer_geometries(config, spec.start, spec.end, geom, prefill_chunk)
    return layer_lengths(geom, local, sliding)


def resident_bytes(
    config: ModelConfig,
    spec: PartitionSpec,
    dtype: str,
    context: int,
    batch: int,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    weights: str = NATIVE,
    kv_dtype: str | None = None,
) -> int:
    """Weights plus KV cache of a partition, without compiling anything: a floor of
    memory_needed, cheap enough to check a plan a peer sent before loading it."""
    spec.validate(config)
    itemsize = jnp.dtype(resolve_kv_dtype(kv_dtype, dtype)).itemsize
    geom = _geometry(config, context, None, jax.default_backend())
    held = partition_weight_bytes(config, spec, dtype, weights)
    lengths = _cache_lengths(config, spec, geom, prefill_chunk)
    return held + cache_nbytes(config, lengths, batch, itemsize)


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
    weights: str = NATIVE,
    kv_dtype: str | None = None,
) -> MemoryEstimate:
    """The parts of what a partition of layers [start, end) needs with a cache of `batch`
    sessions of `context` tokens in `dtype` (see the module docstring). platform: "cpu"
    or an accelerator's ("gpu"); default: this machine's. Temporaries are measured with
    this machine's compiler (a few seconds the first time per model shape).
    zero_copy_load: the weights come from local files (WeightSource.from_dir), which
    JAX on CPU adopts without a copy: no load transient unless the dtype is converted.
    weights: "native" or "int8"; kv_dtype: the cache's (see load_partition)."""
    spec = PartitionSpec(start, end, has_embedding, has_head)
    spec.validate(config)
    check_weights(weights)
    platform = platform or jax.default_backend()
    kv = resolve_kv_dtype(kv_dtype, dtype)
    geom = _geometry(config, context, attn_block, platform)
    stored = config.torch_dtype if config.torch_dtype in SUPPORTED_DTYPES else dtype
    file_itemsize = jnp.dtype(stored).itemsize
    # Quantizing is a conversion: the tensor as read lives until its int8 replaces it.
    # (int8 is quantized on the host, block by block, from the tensor as read: one copy.)
    converting = jnp.dtype(stored) != jnp.dtype(dtype) and weights == NATIVE
    copies = (2 if converting else 1) - (1 if zero_copy_load and platform == "cpu" and weights == NATIVE else 0)
    largest = _largest_tensor(config, spec)
    load = largest * file_itemsize * copies
    if weights != NATIVE:
        load += 4 * min(largest, BLOCK_ENTRIES)  # quant.quantize's float32 block
    return MemoryEstimate(
        weights=partition_weight_bytes(config, spec, dtype, weights, platform),
        kv_cache=cache_nbytes(
            config, _cache_lengths(config, spec, geom, prefill_chunk), batch, jnp.dtype(kv).itemsize
        ),
        temporaries=step_temporaries(config, spec, dtype, geom, prefill_chunk, batch, weights, kv),
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
    weights: str = NATIVE,
    kv_dtype: str | None = None,
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
        weights=weights,
        kv_dtype=kv_dtype,
    ).total
