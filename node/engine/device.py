"""The compute device JAX will use, and how fast it multiplies matrices.

Owns ``probe_device`` (platform, accelerator name and count, accelerator memory),
``accelerator_memory`` (total and free bytes now) and ``measure_tflops`` (a short matmul
benchmark). TFLOPS are measured, never looked up in a table of chips: a few jitted square
f32 matmuls, sized up until one takes a noticeable time, best of several runs.

JAX is imported inside the functions, not at the top: importing it takes seconds, and the
daemon imports this module (through node.cluster.capabilities) at start-up, then calls
these functions in a worker thread, off the event loop. Keep it that way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = [
    "DEFAULT_BENCH_SECONDS",
    "BenchmarkResult",
    "DeviceInfo",
    "accelerator_memory",
    "measure_tflops",
    "probe_device",
]

# Seconds of timed matmuls per measurement.
DEFAULT_BENCH_SECONDS = 1.5


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """The compute device JAX will use."""

    kind: str  # "cpu", "gpu", "tpu" (JAX's platform name)
    name: str | None  # accelerator model, None on CPU
    count: int  # devices of that kind
    memory_total: int | None  # bytes on the first accelerator, None on CPU
    memory_available: int | None
    jax_version: str


@dataclass(frozen=True, slots=True)
class BenchmarkResult:
    tflops: float
    matmul_size: int  # n of the n x n x n f32 matmul that was timed
    seconds: float  # best time of one matmul


def accelerator_memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of the first accelerator; (None, None) on CPU or when the
    backend does not report memory."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return None, None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        return None, None
    total = stats.get("bytes_limit")
    if total is None:
        return None, None
    used = int(stats.get("bytes_in_use", 0))
    return int(total), max(0, int(total) - used)


def probe_device() -> DeviceInfo:
    """Ask JAX which device it will compute on (imports JAX: takes a few seconds)."""
    import jax

    devices = jax.devices()
    first = devices[0]
    if first.platform == "cpu":
        return DeviceInfo("cpu", None, len(devices), None, None, jax.__version__)
    total, available = accelerator_memory()
    return DeviceInfo(
        kind=first.platform,
        name=str(getattr(first, "device_kind", first.platform)),
        count=sum(1 for d in devices if d.platform == first.platform),
        memory_total=total,
        memory_available=available,
        jax_version=jax.__version__,
    )


def measure_tflops(
    max_seconds: float = DEFAULT_BENCH_SECONDS, *, max_size: int | None = None
) -> BenchmarkResult:
    """Time square f32 matmuls with JAX and return the best rate seen.

    The size doubles (from 256 on CPU, 1024 on accelerators) until one matmul takes
    about 1/20 of the budget or the size cap is hit (2048 on CPU, 8192 on
    accelerators), so small CPUs finish quickly and big GPUs are timed on a matrix large
    enough to keep them busy. Then it repeats that matmul (at least 3 runs) and keeps the
    fastest: noise only ever makes a run slower.

    ``max_seconds`` budgets the timed matmuls, not compilation: on a cold GPU the first
    compiles (cuBLAS autotuning) take seconds, and counting them stopped the sizing at
    small, dispatch-bound matrices that under-reported an H200 by 18x. A wall-clock cap
    of ``4 * max_seconds + 20`` s bounds the whole call. Blocking; run it in a thread.
    """
    import jax
    import numpy as np

    wall_cap = time.perf_counter() + 4 * max_seconds + 20
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    cap = max_size or (2048 if on_cpu else 8192)
    matmul = jax.jit(lambda a, b: a @ b)
    # numpy, not jax.random: JAX compiles its RNG once per shape, ~1 s each on a CPU.
    rng = np.random.default_rng(0)

    def timed() -> float:
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        return time.perf_counter() - t0

    n = min(256 if on_cpu else 1024, cap)
    spent = 0.0
    while True:
        a = jax.device_put(rng.standard_normal((n, n), dtype=np.float32), device)
        b = jax.device_put(rng.standard_normal((n, n), dtype=np.float32), device)
        matmul(a, b).block_until_ready()  # compile and warm up: not budgeted
        best = timed()
        spent += best
        # Doubling n costs ~8x per run; the final size needs a warm-up and >= 3 runs.
        too_slow = spent + best * 8 * 4 > max_seconds
        if n * 2 > cap or best >= max_seconds / 20 or too_slow or time.perf_counter() > wall_cap:
            break
        n *= 2

    runs = 1
    while runs < 3 or (spent < max_seconds and runs < 50 and time.perf_counter() < wall_cap):
        took = timed()
        spent += took
        best = min(best, took)
        runs += 1
    best = max(best, 1e-9)
    return BenchmarkResult(tflops=2.0 * n**3 / best / 1e12, matmul_size=n, seconds=best)
