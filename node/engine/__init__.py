"""JAX inference engine: runs a contiguous range of a model's transformer layers.

No networking here; the pipeline calls these public functions:

- ``load_config(model_dir) -> ModelConfig`` (or ``parse_config(dict)``): validate config.json.
- ``WeightSource.from_dir(model_dir)`` / ``WeightSource.from_reader(read_range, files)``:
  tensors read lazily through ``read_range(file_name, offset, length) -> bytes``.
- ``load_partition(source, config, PartitionSpec(start, end, has_embedding, has_head),
  dtype=None, max_context=4096, prefill_chunk=512) -> Partition``: reads only that
  partition's tensors. ``split_layers(num_layers, k)`` gives k contiguous specs.
- New session: ``cache = partition.new_cache(slots)``; a cache holds ``slots`` sessions,
  each session owns one slot index.
- Prefill: ``cache, out = partition.prefill(cache, inputs, start_pos=0, slot=s)``;
  inputs are token ids [n] on the first partition, hidden states [n, hidden] elsewhere;
  out is hidden [n, hidden], or on the last partition float32 logits [vocab] of the last
  prompt position. Long prompts run in chunks padded to power-of-two buckets.
- Decode step: ``cache, out = partition.decode(cache, inputs, positions)`` advances every
  slot at once: inputs [slots] token ids or [slots, hidden]; positions [slots], -1 for
  idle slots; out [slots, hidden] or logits [slots, vocab]. The cache passed in is
  donated: always continue with the returned one.
- Sample: ``SamplerState(SamplingParams(...), vocab_size)`` per session, then
  ``tokens, logprobs = sample_batch(logits[B, V], states)``; ``state.is_stop(token)``.
- Fast path when one partition holds the whole model (embedding and head):
  ``cache, tokens, logprobs = partition.decode_steps(cache, tokens, positions, states, k)``
  runs k decode steps with sampling on the device in one compiled loop (one host sync per
  k tokens; same tokens as decode + sample_batch step by step); tokens/logprobs are
  [slots, k] numpy. Every active slot needs position + k <= max_context. The caller
  discards tokens after a stop token. ``Chain.decode_steps`` for a one-partition chain.
- Memory needed: ``memory_needed(config, start, end, has_embedding, has_head, dtype,
  context, batch) -> bytes`` (weights in dtype + KV cache).
- In-process chains (runner.py): ``load_chain(source, config, specs)`` and
  ``generate(chain, prompt, sampling, max_tokens, block=16)`` yield (token, logprob); a
  one-partition chain decodes in device blocks of ``block`` tokens (decode_steps),
  block=0 or a split chain step by step.
- This machine's device (device.py): ``probe_device() -> DeviceInfo``,
  ``accelerator_memory() -> (total, available)`` bytes (None on CPU) and
  ``measure_tflops(max_seconds) -> BenchmarkResult``.
- ``enable_compilation_cache(directory)``: persist compiled steps across processes.

Errors a user can cause are ``EngineError`` subclasses (errors.py): ModelConfigError,
UnsupportedModelError, WeightsError, MissingTensorError, ShapeMismatchError,
ContextOverflowError, PartitionError, SamplingError.

Importing the package (or ``node.engine.device`` / ``node.engine.errors``) does not import
JAX: a name is imported from its submodule when first used (PEP 562 ``__getattr__``).
JAX takes over a second to import, and the daemon imports the device probe at start-up
but runs it later in a worker thread.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.engine.cache import KVCache
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
        UnsupportedModelError,
        WeightsError,
    )
    from node.engine.memory import memory_needed, partition_param_count
    from node.engine.model import Partition, load_partition
    from node.engine.runner import Chain, generate, load_chain
    from node.engine.sampling import SamplerState, SamplingParams, sample_batch
    from node.engine.weights import PartitionSpec, ReadRange, WeightSource, split_layers

# Where __getattr__ looks for a public name, in this order: the modules without JAX first,
# so that `from node.engine import EngineError` loads errors.py alone.
_SUBMODULES = (
    "errors",
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


def enable_compilation_cache(directory: str | os.PathLike[str]) -> None:
    """Persist XLA compilations in `directory` so later processes skip recompiling."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


__all__ = [
    "BenchmarkResult",
    "Chain",
    "ContextOverflowError",
    "DeviceInfo",
    "EngineError",
    "KVCache",
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
    "UnsupportedModelError",
    "WeightSource",
    "WeightsError",
    "accelerator_memory",
    "enable_compilation_cache",
    "generate",
    "load_chain",
    "load_config",
    "load_partition",
    "measure_tflops",
    "memory_needed",
    "parse_config",
    "partition_param_count",
    "probe_device",
    "sample_batch",
    "split_layers",
]
