"""What this node can do, as advertised in its DHT record.

Owns ``collect`` (OS, CPU, memory, compute device, measured matmul TFLOPS, and the
memory this node lends to the cluster) and ``measure_tflops`` (a short JAX benchmark).

Decisions:

* TFLOPS are measured, never looked up in a table of chips: a few jitted square f32
  matmuls, sized up until one takes a noticeable time, best of several runs. The result
  is cached in ``data_dir/capabilities-cache.json`` under a fingerprint of the machine
  (CPU model, core count, accelerator name, JAX version), so restarts are instant and a
  new GPU or JAX release triggers a new measurement.
* JAX is imported inside functions only: importing it takes seconds, and ``collect`` is
  a plain blocking function the daemon runs in a worker thread, off the event loop.
* ``memory_allowed`` is memory of the device that runs the layers (accelerator memory
  when JAX sees a GPU/TPU, host RAM otherwise): ``resources.max_memory`` when set,
  else 75% of what is available at start, and never more than what is available. It is
  fixed for the life of the process so plans do not churn; ``refresh_memory`` updates
  only the "available" figures for the periodic record refresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from node.config import Config
from node.system.files import atomic_write
from node.system.units import format_size

__all__ = [
    "BENCH_SECONDS_ENV",
    "CACHE_FILE",
    "DEFAULT_MEMORY_FRACTION",
    "BenchmarkResult",
    "Capabilities",
    "DeviceInfo",
    "collect",
    "cpu_model",
    "machine_fingerprint",
    "measure_tflops",
    "probe_device",
]

log = structlog.get_logger(__name__)

CACHE_FILE = "capabilities-cache.json"
# Seconds of timed matmuls per measurement; integration tests that start many daemons
# with fresh data dirs shorten it.
BENCH_SECONDS_ENV = "ENJAMBRE_BENCH_SECONDS"
DEFAULT_BENCH_SECONDS = 1.5
CACHE_VERSION = 1
DEFAULT_MEMORY_FRACTION = 0.75


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


@dataclass(frozen=True, slots=True)
class Capabilities:
    os: str
    platform: str
    arch: str
    cpu_model: str
    cpu_count: int
    memory_total: int  # host RAM, bytes
    memory_available: int  # host RAM available now, bytes
    memory_allowed: int  # bytes of device memory (see module docstring) lent to the cluster
    device: str  # human-readable: accelerator name, else the CPU model
    device_kind: str
    device_count: int
    device_memory_total: int | None
    device_memory_available: int | None
    tflops: float
    tflops_matmul_size: int
    jax_version: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str/int/float/None) for msgpack and JSON."""
        return dataclasses.asdict(self)

    def refresh_memory(self) -> Capabilities:
        """A copy with current available memory (host, and accelerator when present)."""
        device_available = self.device_memory_available
        if self.device_kind != "cpu":
            device_available = _accelerator_memory()[1]
        return dataclasses.replace(
            self,
            memory_available=int(psutil.virtual_memory().available),
            device_memory_available=device_available,
        )


# ---------------------------------------------------------------------------------------
# Machine facts


def cpu_model() -> str:
    """The CPU's marketing name, or the architecture when the OS does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            fields: dict[str, str] = {}
            for line in handle:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in fields and value.strip():
                    fields[key.strip()] = value.strip()
        # x86 says "model name"; ARM boards say "Model" / "Hardware" / "Processor".
        for key in ("model name", "Model", "Hardware", "Processor", "cpu model", "cpu"):
            if key in fields:
                return fields[key]
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _accelerator_memory() -> tuple[int | None, int | None]:
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
    total, available = _accelerator_memory()
    return DeviceInfo(
        kind=first.platform,
        name=str(getattr(first, "device_kind", first.platform)),
        count=sum(1 for d in devices if d.platform == first.platform),
        memory_total=total,
        memory_available=available,
        jax_version=jax.__version__,
    )


def machine_fingerprint(device: DeviceInfo) -> dict[str, Any]:
    """What must be unchanged for a cached benchmark to still be valid."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 1,
        "arch": platform.machine(),
        "device_kind": device.kind,
        "device_name": device.name,
        "jax_version": device.jax_version,
    }


def _fingerprint_key(fingerprint: dict[str, Any]) -> str:
    blob = json.dumps(fingerprint, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


# ---------------------------------------------------------------------------------------
# Benchmark


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


# ---------------------------------------------------------------------------------------
# Cache


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable capabilities cache", path=str(path), error=str(exc))
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    try:
        atomic_write(path, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1))
    except OSError as exc:
        # Not fatal: the node works, it just measures again next start.
        log.warning("cannot write capabilities cache", path=str(path), error=str(exc))


def _cached_benchmark(
    data_dir: Path,
    device: DeviceInfo,
    benchmark: Callable[[], BenchmarkResult],
    remeasure: bool,
) -> BenchmarkResult:
    path = data_dir / CACHE_FILE
    fingerprint = machine_fingerprint(device)
    key = _fingerprint_key(fingerprint)
    entries = _read_cache(path)
    entry = entries.get(key)
    if not remeasure and isinstance(entry, dict):
        try:
            result = BenchmarkResult(
                tflops=float(entry["tflops"]),
                matmul_size=int(entry["matmul_size"]),
                seconds=float(entry["seconds"]),
            )
        except (KeyError, TypeError, ValueError):
            result = None
        if result is not None and result.tflops > 0:
            return result
    log.info("measuring matmul throughput", device=device.name or device.kind)
    result = benchmark()
    if not result.tflops > 0:
        raise RuntimeError(f"benchmark returned a non-positive TFLOPS figure: {result}")
    entries[key] = {
        "fingerprint": fingerprint,
        "tflops": result.tflops,
        "matmul_size": result.matmul_size,
        "seconds": result.seconds,
        "measured_at": time.time(),
    }
    _write_cache(path, entries)
    log.info("measured matmul throughput", tflops=round(result.tflops, 3), n=result.matmul_size)
    return result


# ---------------------------------------------------------------------------------------
# Collect


def _allowed_memory(max_memory: int | None, available: int) -> int:
    if max_memory is None:
        return int(available * DEFAULT_MEMORY_FRACTION)
    if max_memory > available:
        log.warning(
            "resources.max_memory is more than is available; lending what is available",
            max_memory=format_size(max_memory),
            available=format_size(available),
        )
        return available
    return max_memory


def _bench_seconds() -> float:
    raw = os.environ.get(BENCH_SECONDS_ENV)
    if not raw:
        return DEFAULT_BENCH_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 60:
        log.warning(
            f"ignoring ${BENCH_SECONDS_ENV}: expected seconds in (0, 60]",
            value=raw,
            using=DEFAULT_BENCH_SECONDS,
        )
        return DEFAULT_BENCH_SECONDS
    return value


def _default_benchmark() -> BenchmarkResult:
    return measure_tflops(_bench_seconds())


def collect(
    config: Config,
    *,
    data_dir: Path,
    benchmark: Callable[[], BenchmarkResult] | None = None,
    device_probe: Callable[[], DeviceInfo] | None = None,
    remeasure: bool = False,
) -> Capabilities:
    """Gather this node's capabilities. Blocking (JAX start-up, maybe a 1-2 s benchmark).

    ``benchmark`` and ``device_probe`` default to ``measure_tflops`` (budget from
    ``$ENJAMBRE_BENCH_SECONDS``, default 1.5 s) and ``probe_device``; ``remeasure``
    ignores the cache.
    """
    device = (device_probe or probe_device)()
    result = _cached_benchmark(Path(data_dir), device, benchmark or _default_benchmark, remeasure)
    memory = psutil.virtual_memory()
    host_total, host_available = int(memory.total), int(memory.available)
    lendable = (
        device.memory_available
        if device.kind != "cpu" and device.memory_available is not None
        else host_available
    )
    model = cpu_model()
    return Capabilities(
        os=platform.system().lower(),
        platform=platform.platform(),
        arch=platform.machine(),
        cpu_model=model,
        cpu_count=os.cpu_count() or 1,
        memory_total=host_total,
        memory_available=host_available,
        memory_allowed=_allowed_memory(config.resources.max_memory, lendable),
        device=device.name or model,
        device_kind=device.kind,
        device_count=device.count,
        device_memory_total=device.memory_total,
        device_memory_available=device.memory_available,
        tflops=result.tflops,
        tflops_matmul_size=result.matmul_size,
        jax_version=device.jax_version,
    )
