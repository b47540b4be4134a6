"""node.engine.device on this machine's JAX backend (the engine tests force CPU)."""

from __future__ import annotations

import jax

from node.engine.device import accelerator_memory, probe_device


def test_probe_matches_jax() -> None:
    first = jax.devices()[0]
    info = probe_device()
    assert info.kind == first.platform and info.jax_version == jax.__version__
    assert info.count == sum(1 for d in jax.devices() if d.platform == first.platform)
    total, available = accelerator_memory()
    if first.platform == "cpu":
        assert (info.name, info.memory_total, info.memory_available) == (None, None, None)
        assert (total, available) == (None, None)
    else:
        assert info.name and info.memory_total == total
        assert total is None or (available is not None and 0 <= available <= total)
