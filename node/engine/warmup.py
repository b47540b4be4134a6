"""Start the engine ahead of need: import the compiled steps and JAX's backend (seconds, once).

The daemon calls ``warm_up`` in a thread after start-up, so a node's first load of layers
(maybe while it takes over from a node that died mid-answer) does not pay for it.
"""

from __future__ import annotations

__all__ = ["warm_up"]


def warm_up() -> None:
    import jax

    from node.engine import model  # noqa: F401  (the steps, sampling and their imports)

    jax.devices()
