"""Builds the one native piece: the XLA FFI handlers that call ggml's CPU kernels
(node/engine/kernels/ggml_ffi.cc, see node/engine/ggml.py). Everything else is in
pyproject.toml.

The handler needs two sets of headers at build time, both from wheels in the build
environment (pyproject's build-system requires): XLA's FFI API from ``jaxlib`` and ggml's
from ``libggml-python``. It links neither: ggml is opened by path at run time. Without a
C++ compiler (or with a failing build) the install still succeeds, says so loudly, and
the engine takes the pure-JAX path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the build needs the {name} package for its headers")
    return Path(next(iter(spec.submodule_search_locations)))


class OptionalBuildExt(build_ext):
    """build_ext that adds the headers' paths and turns a failed build into a warning."""

    def build_extension(self, ext: Extension) -> None:
        try:
            ext.include_dirs += [str(_package_dir("jaxlib") / "include"),
                                 str(_package_dir("libggml") / "include")]
            super().build_extension(ext)
        except Exception as exc:  # no compiler, missing headers: the pure-JAX path remains
            if os.environ.get("ENJAMBRE_REQUIRE_KERNELS"):
                raise
            sys.stderr.write(
                "\n*** enjambre: the ggml kernels were not built "
                f"({type(exc).__name__}: {exc}).\n*** GGUF models will decode through the "
                "pure-JAX path (same answers, several times slower). Install a C++17 "
                "compiler and reinstall to build them.\n\n")


_FLAGS = ["-std=c++17", "-O2", "-fPIC"]

setup(
    ext_modules=[Extension(
        "node.engine._ggml_ffi",
        sources=["node/engine/kernels/ggml_ffi.cc"],
        language="c++",
        extra_compile_args=_FLAGS,
        libraries=[] if sys.platform == "darwin" else ["dl"],
        optional=True,
    )],
    cmdclass={"build_ext": OptionalBuildExt},
)
