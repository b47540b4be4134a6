"""What this node can do, as advertised in its DHT record.

Owns ``collect`` (OS, CPU, memory, compute device, measured matmul TFLOPS, and the
memory this node lends to the cluster), the host facts and the benchmark cache. The JAX
side (device probe, TFLOPS benchmark) is ``node.engine.device``.

Decisions:

* TFLOPS are measured (``node.engine.device.measure_tflops``), never looked up in a
  table of chips. The result is cached in ``data_dir/capabilities-cache.json`` under a
  fingerprint of the machine (CPU model, core count, accelerator name, JAX version), so
  restarts are instant and a new GPU or JAX release triggers a new measurement.
* Importing this module does not import JAX (that takes seconds): ``node.engine.device``
  imports it inside its functions, and ``collect`` is a plain blocking function the
  daemon runs in a worker thread, off the event loop.
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
from node.engine import device as engine_device  # used via the module: tests patch it there
from node.engine.device import DEFAULT_BENCH_SECONDS, BenchmarkResult, DeviceInfo
from node.system.files import atomic_write
from node.system.units import format_size

__all__ = [
    "BENCH_SECONDS_ENV",
    "CACHE_FILE",
    "DEFAULT_MEMORY_FRACTION",
    "Capabilities",
    "collect",
    "cpu_model",
    "lendable_memory",
    "machine_fingerprint",
]

log = structlog.get_logger(__name__)

CACHE_FILE = "capabilities-cache.json"
# Seconds of timed matmuls per measurement; integration tests that start many daemons
# with fresh data dirs shorten it.
BENCH_SECONDS_ENV = "ENJAMBRE_BENCH_SECONDS"
CACHE_VERSION = 1
DEFAULT_MEMORY_FRACTION = 0.75


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

    @property
    def memory_free(self) -> int:
        """Memory of the device that runs the layers available now (see ``lendable_memory``)."""
        return lendable_memory(self.device_kind, self.device_memory_available, self.memory_available)

    def refresh_memory(self) -> Capabilities:
        """A copy with current available memory (host, and accelerator when present)."""
        device_available = self.device_memory_available
        if self.device_kind != "cpu":
            device_available = engine_device.accelerator_memory()[1]
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


def lendable_memory(device_kind: str, device_available: int | None, host_available: int) -> int:
    """The memory this node could lend: the accelerator's when JAX computes on one
    (and reports it), else host RAM. The one rule for ``memory_allowed`` and ``memory_free``."""
    if device_kind != "cpu" and device_available is not None:
        return device_available
    return host_available


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
    return engine_device.measure_tflops(_bench_seconds())


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
    device = (device_probe or engine_device.probe_device)()
    result = _cached_benchmark(Path(data_dir), device, benchmark or _default_benchmark, remeasure)
    memory = psutil.virtual_memory()
    host_total, host_available = int(memory.total), int(memory.available)
    lendable = lendable_memory(device.kind, device.memory_available, host_available)
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
