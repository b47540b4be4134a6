"""Process-wide settings of JAX's XLA backend, most of which must precede its start.

Owns:
- `apply_numerics_flags()`: XLA flags the engine's numbers depend on; the package
  __init__ calls it on import, before anything can start the backend;
- `configure_memory(max_bytes)`: how much accelerator memory JAX may take (by default
  it grabs 75% of a GPU at start, whatever the node lends);
- `enable_compilation_cache(directory)`: persist compiled steps across processes.

No JAX import at module level (the daemon imports the package at start-up); these
functions only set environment variables or jax.config options.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

# bf16 values must be rounded where the program says, not kept in f32 across fused ops
# when XLA finds it convenient: otherwise where a partition boundary falls (a jit
# boundary rounds, a fusion may not) changes a bf16 model's results.
NUMERICS_FLAGS = ("--xla_allow_excess_precision=false",)

# Device memory JAX's allocator does not get: the CUDA context, cuBLAS/cuDNN workspaces
# and XLA's own reserve live outside the pool the fraction sizes. An estimate, to be
# measured on the device (scripts/gpu_check.sh prints it); memory.py adds it on GPU.
GPU_RUNTIME_RESERVE = 512 * 1024 * 1024


def backend_started() -> bool:
    """True once JAX has created its backend (flags and memory settings are then fixed)."""
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(xb is not None and getattr(xb, "_backends", None))


def apply_numerics_flags() -> None:
    """Add NUMERICS_FLAGS to XLA_FLAGS (keeping the user's); idempotent."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    missing = [f for f in NUMERICS_FLAGS if f.split("=")[0] not in names]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([*flags, *missing])


@dataclass(frozen=True)
class MemorySetup:
    """What configure_memory set: the allocator's fraction of the GPU (None: left to
    JAX), and whether JAX preallocates it."""

    fraction: float | None
    preallocate: bool
    gpu_total: int | None


def gpu_total_memory() -> int | None:
    """Bytes of the first NVIDIA GPU, asked of nvidia-smi (JAX may not start yet)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(out.split()[0]) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def memory_fraction(max_bytes: int, gpu_total: int, reserve: int = GPU_RUNTIME_RESERVE) -> float:
    """The allocator fraction that keeps JAX's whole footprint (pool + runtime reserve)
    within max_bytes of a gpu_total-byte device; pure."""
    if max_bytes <= reserve:
        raise ValueError(
            f"resources.max_memory ({max_bytes} bytes) is no more than the GPU runtime's own "
            f"reserve ({reserve} bytes); lend more memory"
        )
    return max(0.01, min(0.95, (max_bytes - reserve) / gpu_total))


def configure_memory(max_bytes: int | None, *, gpu_total: int | None = None) -> MemorySetup:
    """Limit JAX's accelerator memory to what the node lends; call before JAX starts.

    max_bytes: resources.max_memory (None: the node lends 75% of what is free, which is
    JAX's own default pool, so only preallocation is turned off). The pool is sized
    max_bytes minus GPU_RUNTIME_RESERVE and not preallocated: JAX takes memory as the
    model loads and never more than that. gpu_total: the device's bytes (default: asked
    of nvidia-smi). A no-op without a GPU. Raises RuntimeError if the backend already
    started (the settings would be silently ignored).
    """
    if backend_started():
        raise RuntimeError(
            "configure_memory must run before JAX starts its backend (before the device "
            "probe or any model load)"
        )
    total = gpu_total if gpu_total is not None else gpu_total_memory()
    if total is None:
        return MemorySetup(None, False, None)
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if max_bytes is None:
        return MemorySetup(None, False, total)
    fraction = memory_fraction(max_bytes, total)
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
    return MemorySetup(fraction, False, total)


CACHE_MAX_BYTES = 4 * 2**30


def enable_compilation_cache(directory: str | os.PathLike[str]) -> None:
    """Persist XLA compilations in `directory` so later processes skip recompiling.

    Before JAX is imported this only sets JAX's environment variables (importing JAX takes
    over a second, the daemon calls this on its event loop); afterwards it updates
    jax.config.
    """
    os.makedirs(directory, exist_ok=True)
    # A size limit turns on JAX's file lock around reads and writes, so daemons of one
    # machine can share the directory without reading a half-written entry.
    settings = {
        "jax_compilation_cache_dir": os.fspath(directory),
        "jax_persistent_cache_min_compile_time_secs": "0.5",
        "jax_compilation_cache_max_size": str(CACHE_MAX_BYTES),
    }
    if "jax" not in sys.modules:
        os.environ.update({name.upper(): value for name, value in settings.items()})
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", settings["jax_compilation_cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)

