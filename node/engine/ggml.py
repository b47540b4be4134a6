"""ggml's CPU kernels for GGUF block formats, inside compiled steps through XLA FFI.

The handlers (kernels/ggml_ffi.cc, built by setup.py into ``node/engine/_ggml_ffi*``) take
a matrix as its GGUF block bytes and call ggml's own dot and dequantize kernels from the
``libggml-python`` wheel's prebuilt ``libggml-cpu``. ``unavailable()`` says why they cannot
be used here (None when they can): not built (no C++ compiler at install), the wheel
missing, a CPU without the instructions the wheel was built for (x86-64: AVX2, FMA, F16C),
or the library refusing to load. Every caller then takes the pure-JAX path (blocks.py):
the same numbers, slower. The reason is logged once, on the first load that needs them.

Loading is lazy (first use), never at import, and registers three FFI targets on the CPU
platform: ``enjambre_ggml_matmul`` (y [M, N] = x [M, K] @ W^T),
``enjambre_ggml_matmul_many`` (several matrices of one input: x quantized once, the
rows of all split over the threads together) and ``enjambre_ggml_dequantize``
(W [N, K] in float32).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import importlib.util
import logging
import platform
import sys
from pathlib import Path

import jax
import numpy as np

__all__ = ["DEQUANTIZE_TARGET", "MATMUL_MANY_TARGET", "MATMUL_TARGET", "dot_type", "quantize", "unavailable"]

log = logging.getLogger("enjambre.engine")

MATMUL_TARGET = "enjambre_ggml_matmul"
MATMUL_MANY_TARGET = "enjambre_ggml_matmul_many"
DEQUANTIZE_TARGET = "enjambre_ggml_dequantize"
_X86_FEATURES = ("AVX2", "FMA3", "F16C")  # what libggml-python's x86-64 build assumes


def _extension() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        found = here / f"_ggml_ffi{suffix}"
        if found.is_file():
            return found
    return None


def _library_dir() -> Path | None:
    spec = importlib.util.find_spec("libggml")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    for sub in ("lib64", "lib"):
        if (root / sub).is_dir():
            return root / sub
    return None


def _missing_cpu_features() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    import importlib

    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # numpy 1.x
        umath = importlib.import_module("numpy.core._multiarray_umath")
    features: dict[str, bool] = umath.__cpu_features__
    return [f for f in _X86_FEATURES if not features.get(f, False)]


def _shared_name(stem: str) -> str:
    return f"{stem}.dylib" if sys.platform == "darwin" else f"{stem}.so"


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    ext = _extension()
    if ext is None:
        return None, ("the ggml kernels were not built at install (no C++ compiler, or the build "
                      "failed: reinstall with `pip install -e .` and read its output)")
    libdir = _library_dir()
    if libdir is None:
        return None, "the libggml-python package is not installed (pip install libggml-python)"
    missing = _missing_cpu_features()
    if missing:
        return None, f"this CPU lacks {', '.join(missing)}, which libggml-python's build needs"
    base, cpu = libdir / _shared_name("libggml-base"), libdir / _shared_name("libggml-cpu")
    try:
        lib = ctypes.CDLL(str(ext))
    except OSError as exc:
        return None, f"cannot open {ext.name}: {exc}"
    lib.enjambre_ggml_load.restype = ctypes.c_char_p
    lib.enjambre_ggml_load.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    err = lib.enjambre_ggml_load(str(base).encode(), str(cpu).encode())
    if err is not None:
        return None, f"cannot load ggml from {libdir}: {err.decode(errors='replace')}"
    lib.enjambre_ggml_dot_type.restype = ctypes.c_int
    lib.enjambre_ggml_dot_type.argtypes = [ctypes.c_int]
    jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(lib.EnjambreGgmlMatMul), platform="cpu")
    jax.ffi.register_ffi_target(MATMUL_MANY_TARGET, jax.ffi.pycapsule(lib.EnjambreGgmlMatMulMany),
                                platform="cpu")
    jax.ffi.register_ffi_target(DEQUANTIZE_TARGET, jax.ffi.pycapsule(lib.EnjambreGgmlDequantize),
                                platform="cpu")
    return lib, None


_logged = False


def unavailable() -> str | None:
    """Why ggml's kernels cannot run here, or None when they can (loads them once)."""
    global _logged
    reason = _load()[1]
    if reason is not None and not _logged:
        _logged = True
        log.warning("ggml_kernels_unavailable: %s; GGUF blocks decode through the pure-JAX "
                    "path (same results, slower)", reason)
    return reason


def dot_type(ggml_type: int) -> int:
    """The ggml type activations are quantized to for a weight type (-1 if none)."""
    lib = _load()[0]
    return -1 if lib is None else int(lib.enjambre_ggml_dot_type(ggml_type))



@functools.cache
def _base() -> ctypes.CDLL:
    libdir = _library_dir()
    if libdir is None:
        raise RuntimeError("the libggml-python package is not installed")
    base = ctypes.CDLL(str(libdir / _shared_name("libggml-base")))
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    base.ggml_row_size.restype = ctypes.c_size_t
    base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return base


def quantize(w: np.ndarray, ggml_type: int) -> np.ndarray:
    """w [rows, cols] float32 in a ggml block type by ggml's own quantizer (llama.cpp's,
    without an importance matrix): uint8 [rows, row_bytes]. For tests and benchmarks (the
    gguf package cannot write the K types)."""
    base = _base()
    src = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = src.shape
    out = np.empty((rows, base.ggml_row_size(ggml_type, cols)), np.uint8)
    base.ggml_quantize_chunk(ggml_type, src.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    return out
