"""The package surface: every public name resolves, and importing the package, its
device probe or its errors does not import JAX (the daemon imports them at start-up)."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import node.engine

ROOT = Path(node.engine.__file__).parents[2]


def test_cheap_imports_do_not_load_jax() -> None:
    code = (
        "import json, sys\n"
        "import node.cluster.capabilities, node.engine, node.engine.device, node.engine.errors\n"
        "from node.engine import DeviceInfo, EngineError, ModelConfigError, probe_device\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    loaded = set(json.loads(out.stdout))
    assert not loaded & {"jax", "jaxlib"}, sorted(loaded & {"jax", "jaxlib"})


def test_every_public_name_resolves() -> None:
    for name in node.engine.__all__:
        value = getattr(node.engine, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.startswith("node.engine"), (name, value.__module__)
    missing = "nonexistent"
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        getattr(node.engine, missing)
    from node.engine import model  # submodules still import as usual

    assert model.Partition is node.engine.Partition


def test_type_checking_imports_match_all() -> None:
    # mypy and readers see the TYPE_CHECKING imports; run time serves __all__.
    tree = ast.parse(Path(node.engine.__file__).read_text())
    [block] = [
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    ]
    imported = {
        alias.name
        for stmt in block.body
        if isinstance(stmt, ast.ImportFrom)
        for alias in stmt.names
    }
    assert imported | {"enable_compilation_cache"} == set(node.engine.__all__)
