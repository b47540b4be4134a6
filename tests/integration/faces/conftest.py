"""The ``faces`` fixture: three daemons serving a tiny model split over all three
(tests/helpers/faces.py), started once for this package's tests and stopped after them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.faces import Faces, start_faces


@pytest.fixture(scope="package")
def faces(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Iterator[Faces]:
    f = start_faces(tmp_path_factory.mktemp("faces"), {"XDG_CACHE_HOME": str(shared_cache),
                                                       "PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2"})
    try:
        yield f
    finally:
        f.cluster.close()
