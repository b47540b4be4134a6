"""Tests for node.capabilities: cache reuse, memory limits, the real JAX benchmark."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import msgpack
import psutil
import pytest

from node.cluster import capabilities
from node.cluster.capabilities import (
    CACHE_FILE,
    DEFAULT_MEMORY_FRACTION,
    collect,
    cpu_model,
)
from node.config import Config, load_config
from node.engine import device as engine_device
from node.engine.device import BenchmarkResult, DeviceInfo, measure_tflops, probe_device

CPU = DeviceInfo("cpu", None, 1, None, None, "0.0-test")
GIB = 1024**3


def make_config(tmp_path: Path, resources: str = "") -> Config:
    secret = tmp_path / "cluster.secret"
    secret.write_text("s")
    secret.chmod(0o600)
    path = tmp_path / "node.toml"
    path.write_text(f'[cluster]\nsecret_file = "cluster.secret"\n{resources}')
    return load_config(path)


class CountingBenchmark:
    def __init__(self, tflops: float = 1.25) -> None:
        self.calls = 0
        self.tflops = tflops

    def __call__(self) -> BenchmarkResult:
        self.calls += 1
        return BenchmarkResult(tflops=self.tflops, matmul_size=512, seconds=0.01)


def probe(device: DeviceInfo) -> Callable[[], DeviceInfo]:
    return lambda: device


def test_benchmark_result_is_cached_per_machine(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    data_dir = tmp_path / "data"
    bench = CountingBenchmark()
    first = collect(config, data_dir=data_dir, benchmark=bench, device_probe=probe(CPU))
    assert bench.calls == 1
    assert first.tflops == 1.25 and first.tflops_matmul_size == 512
    cache = json.loads((data_dir / CACHE_FILE).read_text())
    [entry] = cache["entries"].values()
    assert entry["fingerprint"]["jax_version"] == "0.0-test"
    assert entry["tflops"] == 1.25

    second = collect(config, data_dir=data_dir, benchmark=bench, device_probe=probe(CPU))
    assert bench.calls == 1  # reused, not re-run
    assert second.tflops == 1.25

    collect(config, data_dir=data_dir, benchmark=bench, device_probe=probe(CPU), remeasure=True)
    assert bench.calls == 2


def test_new_device_or_jax_version_remeasures(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    bench = CountingBenchmark()
    collect(config, data_dir=tmp_path, benchmark=bench, device_probe=probe(CPU))
    newer_jax = DeviceInfo("cpu", None, 1, None, None, "9.9")
    collect(config, data_dir=tmp_path, benchmark=bench, device_probe=probe(newer_jax))
    assert bench.calls == 2
    gpu = DeviceInfo("gpu", "Test GPU 80GB", 1, 80 * GIB, 79 * GIB, "0.0-test")
    collect(config, data_dir=tmp_path, benchmark=bench, device_probe=probe(gpu))
    assert bench.calls == 3
    # All three machines stay cached side by side.
    collect(config, data_dir=tmp_path, benchmark=bench, device_probe=probe(CPU))
    assert bench.calls == 3
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())["entries"]) == 3


@pytest.mark.parametrize("content", ["{not json", '{"version": 0, "entries": {}}', "[]"])
def test_corrupt_or_old_cache_is_replaced(tmp_path: Path, content: str) -> None:
    config = make_config(tmp_path)
    (tmp_path / CACHE_FILE).write_text(content)
    bench = CountingBenchmark()
    collect(config, data_dir=tmp_path, benchmark=bench, device_probe=probe(CPU))
    assert bench.calls == 1
    assert json.loads((tmp_path / CACHE_FILE).read_text())["version"] == 1


def test_non_positive_benchmark_is_an_error(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with pytest.raises(RuntimeError, match="non-positive"):
        collect(
            config, data_dir=tmp_path, benchmark=CountingBenchmark(0.0), device_probe=probe(CPU)
        )


def test_memory_fields_are_sane_and_default_fraction(tmp_path: Path) -> None:
    caps = collect(
        make_config(tmp_path),
        data_dir=tmp_path,
        benchmark=CountingBenchmark(),
        device_probe=probe(CPU),
    )
    assert caps.memory_total == psutil.virtual_memory().total
    assert 0 < caps.memory_available <= caps.memory_total
    assert caps.memory_allowed == int(caps.memory_available * DEFAULT_MEMORY_FRACTION)
    assert caps.cpu_count >= 1 and caps.cpu_model
    assert caps.device == caps.cpu_model and caps.device_kind == "cpu"
    assert caps.device_memory_total is None


def test_max_memory_is_respected(tmp_path: Path) -> None:
    config = make_config(tmp_path, '[resources]\nmax_memory = "64 MiB"\n')
    caps = collect(
        config, data_dir=tmp_path, benchmark=CountingBenchmark(), device_probe=probe(CPU)
    )
    assert caps.memory_allowed == 64 * 1024**2


def test_max_memory_never_exceeds_available(tmp_path: Path) -> None:
    config = make_config(tmp_path, '[resources]\nmax_memory = "1000 TiB"\n')
    caps = collect(
        config, data_dir=tmp_path, benchmark=CountingBenchmark(), device_probe=probe(CPU)
    )
    assert caps.memory_allowed <= caps.memory_available
    assert caps.memory_allowed > 0


def test_accelerator_memory_is_what_is_lent(tmp_path: Path) -> None:
    gpu = DeviceInfo("gpu", "Test GPU", 2, 16 * GIB, 12 * GIB, "0.0-test")
    bench = CountingBenchmark()
    caps = collect(
        make_config(tmp_path), data_dir=tmp_path, benchmark=bench, device_probe=probe(gpu)
    )
    assert caps.device == "Test GPU" and caps.device_count == 2
    assert caps.device_memory_total == 16 * GIB
    assert caps.memory_allowed == int(12 * GIB * DEFAULT_MEMORY_FRACTION)
    capped = collect(
        make_config(tmp_path, '[resources]\nmax_memory = "20 GiB"\n'),
        data_dir=tmp_path,
        benchmark=bench,
        device_probe=probe(gpu),
    )
    assert capped.memory_allowed == 12 * GIB


def test_to_dict_is_msgpack_friendly_and_refresh_keeps_allowance(tmp_path: Path) -> None:
    caps = collect(
        make_config(tmp_path),
        data_dir=tmp_path,
        benchmark=CountingBenchmark(),
        device_probe=probe(CPU),
    )
    data = caps.to_dict()
    assert msgpack.unpackb(msgpack.packb(data)) == data
    for key in ("device", "memory_total", "memory_allowed", "tflops", "cpu_model", "os"):
        assert key in data
    refreshed = caps.refresh_memory()
    assert refreshed is not caps
    assert refreshed.memory_allowed == caps.memory_allowed
    assert 0 < refreshed.memory_available <= refreshed.memory_total


def test_unwritable_data_dir_still_collects(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    bench = CountingBenchmark()
    caps = collect(
        make_config(tmp_path), data_dir=blocker / "sub", benchmark=bench, device_probe=probe(CPU)
    )
    assert caps.tflops == 1.25 and bench.calls == 1


def test_cpu_model_is_named() -> None:
    assert cpu_model().strip()


def test_real_probe_and_benchmark(tmp_path: Path) -> None:
    # The real thing, kept tiny: JAX on whatever device this machine has.
    device = probe_device()
    assert device.kind in {"cpu", "gpu", "tpu", "cuda", "rocm", "metal"}
    assert device.count >= 1 and device.jax_version
    result = measure_tflops(0.2, max_size=512)
    assert result.tflops > 0
    assert 256 <= result.matmul_size <= 512 and result.seconds > 0
    caps = collect(
        make_config(tmp_path),
        data_dir=tmp_path,
        benchmark=lambda: measure_tflops(0.2, max_size=512),
    )
    assert caps.tflops > 0 and caps.jax_version == device.jax_version


@pytest.mark.parametrize(
    ("env", "expected"), [(None, 1.5), ("0.05", 0.05), ("abc", 1.5), ("0", 1.5), ("1e9", 1.5)]
)
def test_bench_seconds_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str | None, expected: float
) -> None:
    seen: list[float] = []

    def fake_measure(max_seconds: float = 1.5, *, max_size: int | None = None) -> BenchmarkResult:
        seen.append(max_seconds)
        return BenchmarkResult(tflops=2.0, matmul_size=256, seconds=0.1)

    monkeypatch.setattr(engine_device, "measure_tflops", fake_measure)
    if env is None:
        monkeypatch.delenv(capabilities.BENCH_SECONDS_ENV, raising=False)
    else:
        monkeypatch.setenv(capabilities.BENCH_SECONDS_ENV, env)
    caps = collect(make_config(tmp_path), data_dir=tmp_path, device_probe=probe(CPU))
    assert seen == [expected] and caps.tflops == 2.0
