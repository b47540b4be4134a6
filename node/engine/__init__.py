"""JAX inference engine: runs a contiguous range of a model's transformer layers.

No networking here; the pipeline calls these public functions:

- ``load_config(model_dir) -> ModelConfig`` (or ``parse_config(dict)``): validate config.json.
- ``WeightSource.from_dir(model_dir)`` / ``WeightSource.from_reader(read_range, files)``:
  tensors read lazily through ``read_range(file_name, offset, length) -> bytes``.
- ``load_partition(source, config, PartitionSpec(start, end, has_embedding, has_head),
  dtype=None, max_context=4096, prefill_chunk=512, attn_block=None, weights="native",
  kv_dtype=None, block_kernel=None) -> Partition``: reads only that partition's tensors, stored as the file stores them (no
  host transposes). ``weights="int8"`` quantizes every matrix (embedding and head
  included) per output row as it loads: 0.25x the f32 bytes, the same
  decode speed on CPU at batch 1, 1.28x at 8 slots (quant.py); ``partition.weights``
  says which. On CPU a GGUF's block-format matrices (Q4_K, Q8_0, ...) stay as the file
  holds them and decode through ggml's kernels (blocks.py, ggml.py);
  ``block_kernel="dequantize"`` loads them as compute-dtype arrays instead, as on GPU.
  ``split_layers(num_layers, k)`` gives k contiguous specs.
- New sessions: ``cache = partition.new_cache(slots)``; a cache holds ``slots`` sessions,
  each session owns one slot index. Per layer the cache is head-major
  ``[slots, kv_heads, length, head_dim]`` in ``partition.kv_dtype`` (kv_dtype None or
  "auto": float16 beside float32 compute, else the compute dtype); a sliding-window
  model keeps only window + prefill_chunk positions (a ring) when that is less than the
  context.
- Prefill: ``cache, out = partition.prefill(cache, inputs, start_pos=0, slot=s)``; inputs
  are token ids [n] on the first partition, hidden states [n, hidden] elsewhere; out is
  hidden [n, hidden], or on the last partition float32 logits [vocab] of the last prompt
  position ([n, vocab] with all_logits=True). Several sessions at once:
  ``cache, outs = partition.prefill_batch(cache, [inputs...], slots, start_positions)``.
  Chunks of ``prefill_chunk`` tokens start at multiples of prefill_chunk (absolute
  positions), each padded to a power-of-two bucket; ``chunk_spans(start, n, chunk)``
  lists them.
- Interleaving a long prompt with decoding sessions: prefill it one chunk span per call
  (``prefill(cache, ids[a - s:b - s], start_pos=a, slot=x)`` for each (a, b) in
  ``chunk_spans(s, n, prefill_chunk)``) and run a decode step for the other slots between
  calls. The chunks are the ones a single call would run, so the results are identical,
  and a decoding session waits at most one chunk.
- Decode step over any subset of slots (a stage runs exactly the sessions whose
  activations arrived): ``cache, out = partition.decode(cache, inputs, slots, positions)``;
  inputs [k] token ids or [k, hidden]; slots [k] distinct slot ids; positions [k] (-1:
  skip this entry); out [k, hidden] or float32 logits [k, vocab]. The step computes
  ``decode_width(k)`` rows (k rounded up to a power of two; ``width=`` to choose) and
  attends over a half-octave bucket (2^k or 1.5 * 2^k) of the longest session's length, in blocks of
  ``attn_block`` keys. The cache passed in is donated: always continue with the returned one.
- Tail step (the pipeline's last stage): ``cache, t = partition.tail_step(cache, inputs,
  slots, positions, states, top_logprobs=0)``: decode + sampling in one compiled call;
  ``t.tokens`` int64 [k], ``t.logprobs`` [k] (raw model log-probabilities), and with
  top_logprobs=n ``t.top_ids`` / ``t.top_logprobs`` [k, n]. Logits stay on the device.
  States advance by one step. ``Chain.tail_step`` runs a whole chain this way.
- Sample logits on the host side: ``SamplerState(SamplingParams(...), vocab_size)`` per
  session, ``tokens, logprobs = sample_batch(logits[B, V], states)``; ``state.is_stop(t)``.
  Sampling takes the top 64 candidates first (more if a top_k asks), never sorts the
  vocabulary unless a top-p nucleus is wider than the candidates; greedy is an argmax.
- Fast path when one partition holds the whole model (embedding and head):
  ``cache, tokens, logprobs = partition.decode_steps(cache, tokens, slots, positions,
  states, k)`` runs k decode steps with sampling on the device in one compiled loop (one
  host sync per k tokens; the same tokens as tail_step step by step); tokens/logprobs are
  [slots, k] numpy. Every active slot needs position + k <= max_context. The caller
  discards tokens after a stop token. ``Chain.decode_steps`` for a one-partition chain.
- Exact replay after a failure: rebuild a session on new owners from its prompt and the
  tokens already emitted, teacher-forced: prefill the prompt, then one decode step per
  emitted token (``Chain.replay(caches, slot, prompt, emitted, width=1)`` is the
  in-process reference; a pipeline runs the same calls stage by stage). The rebuilt
  session's next logits equal the undisturbed run's bit for bit when:
    1. same weights, compute dtype, device kind, JAX/XLA version and engine flags
       (``apply_numerics_flags``: bf16 is rounded where the program says);
    2. the same prefill_chunk and the same attention block (attn_block, or the
       context's power-of-two bucket when that is smaller); max_context, the pool size,
       the slot, the partition boundaries and the key buckets may all differ (masked key
       blocks are exact no-ops; layers compute the same whether or not a jit boundary
       falls between them);
    3. the prompt is prefilled one session per call (prefill, or prefill_batch alone),
       with chunk boundaries at multiples of prefill_chunk, as the first run did;
    4. every emitted token is replayed by a decode (or tail) step of the width (row count)
       that generated it: matmul kernels differ by row count (on XLA CPU 1, 2-8 and 9+
       rows take three kernels), while the other rows' contents never matter. A driver
       that decodes a session at a fixed width (e.g. ``width=1`` alone, or always the
       pool size) needs to record nothing; decode_steps' device loop is a different
       program and is not replayed exactly (pipelines never use it).
  Where widths differ, tokens still match unless two logits tie within float rounding.
- Memory needed: ``memory_needed(config, start, end, has_embedding, has_head, dtype,
  context, batch, prefill_chunk=512, platform="cpu") -> bytes`` for the planner: weights,
  KV cache, the compiled steps' temporaries (prefill chunk, decode at ``batch`` slots,
  sampling), the host peak while loading and, on GPU, the runtime reserve outside JAX's
  pool. ``memory_estimate(...)`` returns the parts; both (and ``resident_bytes``,
  ``partition_weight_bytes``) take ``weights="int8"`` to count int8 weights.
- In-process chains (runner.py): ``load_chain(source, config, specs)`` and
  ``generate(chain, prompt, sampling, max_tokens, block=16)`` yield (token, logprob); a
  one-partition chain decodes in device blocks of ``block`` tokens (decode_steps),
  block=0 or a split chain with one tail step per token.
- This machine's device (device.py): ``probe_device() -> DeviceInfo``,
  ``accelerator_memory() -> (total, available)`` bytes (None on CPU) and
  ``measure_tflops(max_seconds) -> BenchmarkResult``.
- Process setup (backend.py), before anything starts JAX: ``configure_memory(max_bytes)``
  sizes JAX's GPU pool to what the node lends and turns preallocation off;
  ``enable_compilation_cache(directory)`` persists compiled steps across processes.
  Compiled steps are keyed on the partition's shape (layer count, embedding/head, dtype,
  cache geometry, buckets), never its layer range, so partitions of the same shape share
  them.

Errors a user can cause are ``EngineError`` subclasses (errors.py): ModelConfigError,
UnsupportedModelError, WeightsError, MissingTensorError, ShapeMismatchError,
ContextOverflowError, PartitionError, TokenRangeError, SamplingError.

Importing the package (or ``node.engine.device`` / ``node.engine.errors``) does not import
JAX: a name is imported from its submodule when first used (PEP 562 ``__getattr__``).
JAX takes over a second to import, and the daemon imports the device probe at start-up
but runs it later in a worker thread. Importing it does set XLA_FLAGS
(``apply_numerics_flags``), so the flags are in place before any JAX backend starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from node.engine.backend import apply_numerics_flags

apply_numerics_flags()

if TYPE_CHECKING:
    from node.engine.backend import MemorySetup, configure_memory, enable_compilation_cache
    from node.engine.buckets import chunk_spans, decode_width, pow2_bucket
    from node.engine.cache import CacheGeometry, KVCache
    from node.engine.config import ModelConfig, load_config, parse_config
    from node.engine.device import (
        BenchmarkResult,
        DeviceInfo,
        accelerator_memory,
        measure_tflops,
        probe_device,
    )
    from node.engine.errors import (
        ContextOverflowError,
        EngineError,
        MissingTensorError,
        ModelConfigError,
        PartitionError,
        SamplingError,
        ShapeMismatchError,
        TokenRangeError,
        UnsupportedModelError,
        WeightsError,
    )
    from node.engine.memory import (
        MemoryEstimate,
        memory_estimate,
        memory_needed,
        partition_param_count,
        partition_weight_bytes,
    )
    from node.engine.model import Partition, TailTokens, load_partition
    from node.engine.runner import Chain, generate, load_chain
    from node.engine.sampling import SamplerState, SamplingParams, sample_batch
    from node.engine.weights import PartitionSpec, ReadRange, WeightSource, split_layers

# Where __getattr__ looks for a public name, in this order: the modules without JAX first,
# so that `from node.engine import EngineError` loads errors.py alone.
_SUBMODULES = (
    "errors",
    "backend",
    "buckets",
    "device",
    "config",
    "weights",
    "cache",
    "memory",
    "sampling",
    "model",
    "runner",
)


def __getattr__(name: str) -> Any:
    if name not in __all__:
        # Also how `from node.engine import model` falls through to the submodule.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for sub in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{sub}")
        if hasattr(module, name):
            value = getattr(module, name)
            globals()[name] = value
            return value
    raise AttributeError(f"{__name__}.{name} is in __all__ but in none of {_SUBMODULES}")


__all__ = [
    "BenchmarkResult",
    "CacheGeometry",
    "Chain",
    "ContextOverflowError",
    "DeviceInfo",
    "EngineError",
    "KVCache",
    "MemoryEstimate",
    "MemorySetup",
    "MissingTensorError",
    "ModelConfig",
    "ModelConfigError",
    "Partition",
    "PartitionError",
    "PartitionSpec",
    "ReadRange",
    "SamplerState",
    "SamplingError",
    "SamplingParams",
    "ShapeMismatchError",
    "TailTokens",
    "TokenRangeError",
    "UnsupportedModelError",
    "WeightSource",
    "WeightsError",
    "accelerator_memory",
    "chunk_spans",
    "configure_memory",
    "decode_width",
    "enable_compilation_cache",
    "generate",
    "load_chain",
    "load_config",
    "load_partition",
    "measure_tflops",
    "memory_estimate",
    "memory_needed",
    "parse_config",
    "partition_param_count",
    "partition_weight_bytes",
    "pow2_bucket",
    "probe_device",
    "sample_batch",
    "split_layers",
]
