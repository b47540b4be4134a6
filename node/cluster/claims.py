"""How much of a member's claims about itself a node believes.

Every member holds the cluster secret, so any member may be the one that lies. A member's
record says what it lends (memory) and how fast it is (TFLOPS); nothing outside the member
can check either before it serves, so planners use them capped to what such a machine can
be (``capped``: a CPU's TFLOPS by its core count, memory by what the record says the machine
has, and absolute ceilings), and ``doubtful`` names the claims that had to be capped (shown
by `nodectl status`). Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_MEMORY", "TFLOPS_PER_CORE", "TFLOPS_PER_DEVICE", "capped", "doubtful"]

MAX_MEMORY = 64 * 2**40  # bytes one machine may lend (64 TiB)
TFLOPS_PER_CORE = 0.25  # an AVX-512 core at 4 GHz does ~0.26 f32 TFLOPS at best
TFLOPS_PER_DEVICE = 2500.0  # a 2025 accelerator's dense low-precision peak
MAX_CORES, MAX_DEVICES = 1024, 16


def _count(r: Mapping[str, Any], key: str, high: int) -> int:
    value = r.get(key)
    return min(value, high) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def capped(r: Mapping[str, Any]) -> tuple[int, float]:
    """(memory it lends, TFLOPS) as the planner uses them: the claims, within what the
    record's own machine can have."""
    memory = min(_count(r, "memory_allowed", MAX_MEMORY), _count(r, "memory_total", MAX_MEMORY) or MAX_MEMORY)
    claim = r.get("tflops")
    tflops = float(claim) if isinstance(claim, int | float) and not isinstance(claim, bool) else 0.0
    if not (math.isfinite(tflops) and tflops > 0):
        tflops = 0.0
    if r.get("device_kind", "cpu") == "cpu":
        ceiling = TFLOPS_PER_CORE * max(1, _count(r, "cpu_count", MAX_CORES))
    else:
        ceiling = TFLOPS_PER_DEVICE * max(1, _count(r, "device_count", MAX_DEVICES))
    return memory, min(tflops, ceiling)


def doubtful(r: Mapping[str, Any]) -> list[str]:
    """The claims of a record that ``capped`` had to lower (empty for an honest machine)."""
    memory, tflops = capped(r)
    out = []
    if _count(r, "memory_allowed", 2**63) > memory:
        out.append(f"lends {r.get('memory_allowed')} bytes, more than it can have")
    claim = r.get("tflops")
    if isinstance(claim, int | float) and not isinstance(claim, bool) and claim > tflops:
        out.append(f"claims {claim:g} TFLOPS, more than its {r.get('device_kind', 'cpu')} can do ({tflops:g})")
    return out
