"""Fixtures that start real daemons on 127.0.0.1 and always tear them down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node.testing.localcluster import LocalCluster


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The measured-TFLOPS cache is per machine: share it so each daemon does not re-measure.
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture
def cluster(tmp_path: Path, shared_cache: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path / "cluster", env={"XDG_CACHE_HOME": str(shared_cache), "PYTHONUNBUFFERED": "1",
                                                       "ENJAMBRE_BENCH_SECONDS": "0.2"})
    try:
        yield c
    finally:
        c.close()

