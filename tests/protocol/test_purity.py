"""protocol/ stays sans-I/O: no asyncio, sockets, JAX, uvloop or aiohttp."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import protocol

FORBIDDEN = {"asyncio", "socket", "ssl", "selectors", "jax", "jaxlib", "uvloop", "aiohttp"}
PROTOCOL_DIR = Path(protocol.__file__).parent


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            roots.add("__import__")  # dynamic imports would dodge this check
    return roots


def test_source_imports_nothing_forbidden() -> None:
    files = sorted(PROTOCOL_DIR.glob("*.py"))
    assert files
    for path in files:
        bad = _imported_roots(path) & (FORBIDDEN | {"__import__", "importlib"})
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_protocol_loads_nothing_forbidden() -> None:
    code = (
        "import json, sys, pkgutil, importlib, protocol\n"
        "for m in pkgutil.iter_modules(protocol.__path__):\n"
        "    importlib.import_module('protocol.' + m.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    root = PROTOCOL_DIR.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True, timeout=120
    )
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert not loaded & FORBIDDEN, sorted(loaded & FORBIDDEN)
