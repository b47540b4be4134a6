"""The daemon sizes JAX's accelerator pool from resources.max_memory and points JAX's
persistent compilation cache at the data dir, before anything starts JAX.

Each case runs in a fresh interpreter (JAX reads these settings once, at backend start),
with a stand-in nvidia-smi on PATH reporting an 80 GiB GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_MIB = 81920

SCRIPT = """
import json, os, sys
from node.config import load_config
from node import daemon
daemon._prepare_engine(load_config(__import__("pathlib").Path(sys.argv[1])))
keys = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
        "JAX_COMPILATION_CACHE_DIR")
out = {k: os.environ.get(k) for k in keys}
out["jax_imported"] = "jax" in sys.modules
import jax
out["cache_dir"] = jax.config.jax_compilation_cache_dir
print(json.dumps(out))
"""


def _start(tmp_path: Path, resources: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {GPU_MIB}\n")
    smi.chmod(0o755)
    secret = tmp_path / "cluster.secret"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\ndata_dir = "data"\n{resources}\n[cluster]\nsecret_file = "cluster.secret"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_PYTHON", "JAX_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _run(tmp_path: Path, resources: str) -> dict[str, object]:
    proc = _start(tmp_path, resources)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_max_memory_bounds_the_gpu_pool_and_cache_is_in_data_dir(tmp_path: Path) -> None:
    out = _run(tmp_path, '[resources]\nmax_memory = "8GiB"\n')
    reserve = 512 * 2**20
    expected = (8 * 2**30 - reserve) / (GPU_MIB * 2**20)
    assert float(str(out["XLA_PYTHON_CLIENT_MEM_FRACTION"])) == pytest.approx(expected, abs=1e-4)
    assert out["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    cache = tmp_path / "data" / "xla-cache"
    # Set before JAX was imported, so the daemon's loop never waited for the import.
    assert out["jax_imported"] is False
    assert out["JAX_COMPILATION_CACHE_DIR"] == str(cache)
    assert out["cache_dir"] == str(cache)
    assert cache.is_dir()


def test_without_max_memory_only_preallocation_is_turned_off(tmp_path: Path) -> None:
    out = _run(tmp_path, "")
    assert out["XLA_PYTHON_CLIENT_MEM_FRACTION"] is None
    assert out["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def test_lending_less_than_the_gpu_runtime_needs_is_a_clear_error(tmp_path: Path) -> None:
    proc = _start(tmp_path, '[resources]\nmax_memory = "256MiB"\n')
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("node.daemon.DaemonError: resources.max_memory (268435456 bytes)")
    assert "lend more memory" in last
