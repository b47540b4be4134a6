"""The pipeline planner: which nodes serve which contiguous layers of one model.

Owns ``make_plan`` (pure: node offers and the model's memory cost in, a ``Plan`` out; the
``Plan`` wire form peers exchange is protocol/plan.py's). Decisions:

* Fewest nodes first: each hop costs a round trip per token. Nodes rank by tflops, then
  memory, then node_id; among sets of one size the set whose members rank best wins
  (compared member by member, the order ``itertools.combinations`` yields them in).
* Search: exhaustive up to ``EXHAUSTIVE_MAX`` free candidates (the first set that fits
  is the best); beyond, greedy: the k best-ranked, and while they do not fit the member
  lending least is swapped for the best-ranked outsider lending more. A set lending less
  than the whole model needs on one node is skipped (a split never needs less in total).
  ``need`` is cached: one call per (start, end), so the search is O(layers**2) calls.
* Layout: ranges in proportion to lent memory, then each boundary clamped between what
  its stage holds and what the later stages still need (packed from the end), so layers
  move off a node that overflows onto one with room. Every stage returned was checked
  with ``need``, assumed monotone (a range with more layers never needs less).
* Chain order: a greedy low-rtt path from the best-ranked node (an unmeasured link
  counts as infinitely slow, so without measurements it is the rank order); if a set
  does not fit in that order, the two biggest at the ends (they carry the embedding and
  the head), biggest first, then biggest last. Three orders, not all k!: a set that
  fits only in some other order counts as not fitting.
* Round trips: a link is too slow when either end measured it above ``max_rtt_ms``.
  Nodes are set aside one at a time, most too-slow links first (least preferred on
  ties) until none is left; never a pinned node. They are used only when the model
  fits nowhere without them, then as few as possible.
* Pins: a pinned node is always in the plan; a pin with a range fixes that stage, and
  the other nodes fill the gaps between pinned ranges in chain order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from node.system.units import format_size
from protocol.plan import Plan, Stage

__all__ = ["EXHAUSTIVE_MAX", "ModelCost", "NodeOffer", "Pin", "Plan", "PlanError", "Stage",
           "make_plan"]

EXHAUSTIVE_MAX = 12  # C(12, 6) = 924 sets at worst; C(32, 16) would be 6 * 10**8
_MAX_GAP_SPLITS = 256  # ways to share the free nodes between the gaps pins leave


class PlanError(Exception):
    """No plan can be made (or a peer sent a malformed one); the message says why."""


@dataclass(frozen=True)
class NodeOffer:
    node_id: str
    name: str
    memory: int  # bytes this node lends to the cluster
    tflops: float  # measured compute speed
    rtt_ms: Mapping[str, float] = field(default_factory=dict)  # measured round trip to node ids


@dataclass(frozen=True)
class ModelCost:
    num_layers: int
    need: Callable[[int, int, bool, bool], int]  # bytes for [start, end), has_embedding, has_head
    # (has_embedding, has_head, base, per_layer) when need is a line per end (cost.py's):
    # published with the plan, so a driver that adopts it re-plans without compiling.
    lines: tuple[tuple[bool, bool, int, int], ...] = ()


@dataclass(frozen=True)
class Pin:
    node_id: str
    start: int | None = None  # with end: the node serves exactly [start, end)
    end: int | None = None


def make_plan(cost: ModelCost, nodes: Sequence[NodeOffer], *, max_rtt_ms: float | None = None,
              pins: Sequence[Pin] = (), exclude: Collection[str] = ()) -> Plan:
    """Choose the nodes and their layer ranges for ``cost`` (the module docstring says how)."""
    last = cost.num_layers
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise PlanError(f"the model must have at least one layer, got num_layers={last!r}")
    if max_rtt_ms is not None and not max_rtt_ms >= 0:
        raise PlanError(f"max_rtt_ms must be a number of milliseconds >= 0, got {max_rtt_ms!r}")
    if not nodes:
        raise PlanError("no nodes to plan on: none lends memory to the cluster; start a node first")
    offered: dict[str, NodeOffer] = {}
    for n in nodes:
        if n.node_id in offered:
            raise PlanError(f"node id {n.node_id} is offered twice ({offered[n.node_id].name}, {n.name})")
        offered[n.node_id] = n
    # "> 0" maps a peer's NaN to 0: NaN would make the order, so the plan, depend on input order.
    speed = {n.node_id: n.tflops if n.tflops > 0 else 0.0 for n in offered.values()}
    ranked = sorted(offered.values(), key=lambda n: (-speed[n.node_id], -n.memory, n.node_id))
    p = _Problem(cost, ranked, _check_pins(cost, pins, offered, exclude))
    one_layer = min(p.need(s, s + 1) for s in range(last))
    left_out: dict[str, str] = {}
    usable: list[NodeOffer] = []
    for n in ranked:
        if n.node_id in exclude:
            left_out[n.node_id] = "excluded"
        elif n.memory >= one_layer:
            usable.append(n)
        elif n.node_id in p.pins:
            raise PlanError(f"pinned node {_label(n)} lends {format_size(n.memory)}, less than one "
                            f"layer needs ({format_size(one_layer)}); unpin it or lend it more memory")
        else:
            left_out[n.node_id] = (f"lends {format_size(n.memory)}, "
                                   f"one layer needs {format_size(one_layer)}")
    far = _far_nodes(usable, max_rtt_ms, p.pins)
    fixed = [n for n in usable if n.node_id in p.pins]
    near = [n for n in usable if n.node_id not in p.pins and n.node_id not in far]
    aside = [n for n in usable if n.node_id not in p.pins and n.node_id in far]
    stages = p.search(fixed, near, []) or (p.search(fixed, near, aside) if aside else None)
    if stages is None:
        raise _no_fit(p, usable, far, [(offered[i].name, why) for i, why in left_out.items()])
    return Plan(tuple(stages))


def _label(n: NodeOffer) -> str:
    return f"{n.name} ({n.node_id})"


def _check_pins(cost: ModelCost, pins: Sequence[Pin], offered: Mapping[str, NodeOffer],
                exclude: Collection[str]) -> dict[str, tuple[int, int] | None]:
    """Pinned node id -> its fixed range (None: anywhere), after checking every pin."""
    out: dict[str, tuple[int, int] | None] = {}
    last = cost.num_layers
    for pin in pins:
        n = offered.get(pin.node_id)
        if n is None:
            names = ", ".join(sorted(x.name for x in offered.values()))
            raise PlanError(f"pinned node {pin.node_id} is not among the {len(offered)} nodes "
                            f"offered ({names}); unpin it or start it")
        if pin.node_id in exclude:
            raise PlanError(f"node {_label(n)} is both pinned and excluded; unpin it")
        if pin.node_id in out:
            raise PlanError(f"node {_label(n)} is pinned twice")
        start, end = pin.start, pin.end
        out[pin.node_id] = None
        if start is None and end is None:
            continue
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= last):
            raise PlanError(f"pin for {_label(n)} asks for layers [{start}, {end}): need integers "
                            f"with 0 <= start < end <= {last}, the model's layer count")
        need = cost.need(start, end, start == 0, end == last)
        if need > n.memory:
            raise PlanError(f"pinned node {_label(n)} cannot serve layers [{start}, {end}): they "
                            f"need {format_size(need)}, it lends {format_size(n.memory)}; pin fewer")
        out[pin.node_id] = (start, end)
    spans = sorted((r, i) for i, r in out.items() if r is not None)
    for (a, i), (b, j) in itertools.pairwise(spans):
        if b[0] < a[1]:
            raise PlanError(f"pins overlap: {i} has layers [{a[0]}, {a[1]}), {j} has [{b[0]}, {b[1]})")
    return out


def _rtt(a: NodeOffer, b: NodeOffer) -> float | None:
    """The slower of the two measurements of a link (x == x drops NaN), None if unmeasured."""
    both = (a.rtt_ms.get(b.node_id), b.rtt_ms.get(a.node_id))
    known = [x for x in both if x is not None and x == x]
    return max(known) if known else None


def _far_nodes(usable: list[NodeOffer], limit: float | None, pins: Collection[str]) -> dict[str, str]:
    """Nodes set aside for their round trips (id -> why); ``usable`` is in rank order."""
    if limit is None:
        return {}
    slow: dict[str, dict[str, float]] = {n.node_id: {} for n in usable}
    for a, b in itertools.combinations(usable, 2):
        r = _rtt(a, b)
        if r is not None and r > limit:
            slow[a.node_id][b.node_id] = slow[b.node_id][a.node_id] = r
    names = {n.node_id: n.name for n in usable}
    far: dict[str, str] = {}
    while True:
        links = {n.node_id: {o: r for o, r in slow[n.node_id].items() if o not in far}
                 for n in reversed(usable) if n.node_id not in pins and n.node_id not in far}
        # max() keeps the first of equals; reversed() makes that the least preferred.
        worst = max(links, key=lambda i: len(links[i]), default=None)
        if worst is None or not links[worst]:
            return far
        other, r = max(links[worst].items(), key=lambda kv: kv[1])
        far[worst] = f"round trip {r:g} ms to {names[other]}, over the {limit:g} ms limit"


class _Problem:
    """One planning problem: the cost (cached per range), the ranks and the pins."""

    def __init__(self, cost: ModelCost, ranked: list[NodeOffer],
                 pins: dict[str, tuple[int, int] | None]) -> None:
        self.cost, self.pins, self.last = cost, pins, cost.num_layers
        self.rank = {n.node_id: i for i, n in enumerate(ranked)}
        self._cache: dict[tuple[int, int], int] = {}
        self.ranged = {i: r for i, r in pins.items() if r is not None}
        edges = [0, *itertools.chain.from_iterable(sorted(self.ranged.values())), self.last]
        self.gaps = [(a, c) for a, c in zip(edges[::2], edges[1::2], strict=True) if a < c]
        self.free_layers = sum(c - a for a, c in self.gaps)
        self.loose = len(pins) - len(self.ranged)  # pinned nodes without a range
        if self.loose > self.free_layers:
            raise PlanError(f"the pinned ranges leave {self.free_layers} free layers, fewer than the "
                            f"{self.loose} pinned nodes without a range need; unpin some")
        self.floor = self.need(0, self.last)

    def need(self, start: int, end: int) -> int:
        if (start, end) not in self._cache:
            self._cache[start, end] = self.cost.need(start, end, start == 0, end == self.last)
        return self._cache[start, end]

    def search(self, fixed: list[NodeOffer], near: list[NodeOffer],
               far: list[NodeOffer]) -> list[Stage] | None:
        """The first set (fewest nodes, then fewest far, then best ranks) that fits, laid out."""
        pool = near + far
        top = list(itertools.accumulate(sorted((n.memory for n in pool), reverse=True), initial=0))
        base = sum(n.memory for n in fixed)
        most = min(len(pool), self.free_layers - self.loose)
        for m in range(max(0, len(self.gaps) - self.loose), most + 1):
            if base + top[m] < self.floor:
                continue
            if len(pool) > EXHAUSTIVE_MAX:
                if stages := self._greedy(fixed, pool, m):
                    return stages
                continue
            for f in range(1, min(m, len(far)) + 1) if far else (0,):
                for a in itertools.combinations(near, m - f):
                    for b in itertools.combinations(far, f):
                        if stages := self.place([*fixed, *a, *b]):
                            return stages
        return None

    def _greedy(self, fixed: list[NodeOffer], pool: list[NodeOffer], m: int) -> list[Stage] | None:
        pos = {n.node_id: i for i, n in enumerate(pool)}
        chosen, outside = pool[:m], pool[m:]  # both kept in pool order
        for _ in range(len(pool)):  # every swap raises the memory lent; the cap bounds the work
            if stages := self.place([*fixed, *chosen]):
                return stages
            # Out goes the member lending least (the least preferred of equals), in comes the
            # best-ranked outsider lending more.
            small = min(chosen, key=lambda n: (n.memory, -pos[n.node_id]), default=None)
            bigger = [n for n in outside if small and n.memory > small.memory]
            if small is None or not bigger:
                return None
            chosen = [n for n in chosen if n is not small] + bigger[:1]
            outside = [n for n in outside if n is not bigger[0]] + [small]
            chosen.sort(key=lambda n: pos[n.node_id])
            outside.sort(key=lambda n: pos[n.node_id])
        return None

    def place(self, members: list[NodeOffer]) -> list[Stage] | None:
        """Lay ``members`` out along the layers, or None when no order tried fits."""
        if sum(n.memory for n in members) < self.floor:
            return None  # without calling need(): a split never needs less than the whole
        pinned = [Stage(i, s, e, self.need(s, e)) for i, (s, e) in self.ranged.items()]
        free = [n for n in members if n.node_id not in self.ranged]
        for order in self._orders(free):
            for counts in self._gap_splits(len(order)):
                stages, i = list(pinned), 0
                for (a, c), k in zip(self.gaps, counts, strict=True):
                    if (bounds := self._fill(order[i : i + k], a, c)) is None:
                        break
                    stages += [Stage(n.node_id, s, e, self.need(s, e))
                               for n, s, e in zip(order[i : i + k], bounds, bounds[1:], strict=False)]
                    i += k
                else:
                    return sorted(stages, key=lambda s: s.start)
        return None

    def _orders(self, free: list[NodeOffer]) -> list[list[NodeOffer]]:
        rest = sorted(free, key=lambda n: self.rank[n.node_id])
        path = rest[:1]
        del rest[:1]
        while rest:
            hops = [(_rtt(path[-1], n), self.rank[n.node_id]) for n in rest]
            keys = [(math.inf if r is None else r, k) for r, k in hops]
            path.append(rest.pop(keys.index(min(keys))))
        # Stage 0 carries the embedding and the last stage the head: the two biggest at the ends.
        big = sorted(free, key=lambda n: (-n.memory, self.rank[n.node_id]))
        ends = [big[:1] + big[2:] + big[1:2], big[1:2] + big[2:] + big[:1]]
        return [path, *(o for i, o in enumerate(ends) if o != path and o not in ends[:i])]

    def _gap_splits(self, m: int) -> list[tuple[int, ...]]:
        """Ways to give each gap a run of the m free nodes, closest to its share of layers first."""
        if not self.gaps:
            return [()] if m == 0 else []
        lengths = [c - a for a, c in self.gaps]
        cuts = itertools.islice(itertools.combinations(range(1, m), len(lengths) - 1), _MAX_GAP_SPLITS)
        splits = [tuple(b - a for a, b in itertools.pairwise((0, *c, m))) for c in cuts]
        splits = [s for s in splits if all(k <= n for k, n in zip(s, lengths, strict=True))]
        return sorted(splits, key=lambda s: sum(abs(k * self.free_layers - m * n)
                                                for k, n in zip(s, lengths, strict=True)))

    def _fits(self, n: NodeOffer, start: int, end: int) -> bool:
        return self.need(start, end) <= n.memory

    def _fill(self, nodes: list[NodeOffer], a: int, c: int) -> list[int] | None:
        """Boundaries for ``nodes`` (in order) over layers [a, c), each stage fitting, or None."""
        k = len(nodes)
        if not 0 < k <= c - a:
            return None
        # lo[i]: the lowest start of stage i from which stages i.. still fit (packed from the end).
        lo = [a] * k + [c]
        for i in range(k - 1, 0, -1):
            p = lo[i + 1] - 1
            if p < a + i or not self._fits(nodes[i], p, lo[i + 1]):
                return None
            while p - 1 >= a + i and self._fits(nodes[i], p - 1, lo[i + 1]):
                p -= 1
            lo[i] = p
        if not self._fits(nodes[0], a, lo[1]):
            return None
        bounds = [a]
        for i, target in enumerate(_proportional(nodes, a, c)[1:-1]):
            low = max(lo[i + 1], bounds[i] + 1)
            e = min(max(target, low), c - (k - 1 - i))
            while e > low and not self._fits(nodes[i], bounds[i], e):
                e -= 1
            if not self._fits(nodes[i], bounds[i], e):
                return lo  # need() is not monotone here; the packed layout was checked
            bounds.append(e)
        return [*bounds, c] if self._fits(nodes[-1], bounds[-1], c) else lo


def _proportional(nodes: list[NodeOffer], a: int, c: int) -> list[int]:
    """Boundaries over [a, c) in proportion to memory lent, each stage >= 1 layer."""
    total, acc, k = sum(n.memory for n in nodes) or 1, 0, len(nodes)
    bounds = [a]
    for i, n in enumerate(nodes[:-1]):
        acc += n.memory
        target = a + (2 * (c - a) * acc + total) // (2 * total)  # round half up, in integers
        bounds.append(min(max(target, bounds[-1] + 1), c - (k - 1 - i)))
    return [*bounds, c]


def _no_fit(p: _Problem, usable: list[NodeOffer], far: Mapping[str, str],
            left_out: list[tuple[str, str]]) -> PlanError:
    gone = "; ".join(f"{name} ({why})" for name, why in left_out) or "none"
    if not usable:
        return PlanError(f"no node can serve the model: every node offered is left out: {gone}")
    chain = usable[: p.last]
    needed = sum(p.need(s, e) for s, e in itertools.pairwise(_proportional(chain, 0, p.last)))
    lent = sum(n.memory for n in usable)
    considered = "; ".join(f"{n.name} ({format_size(n.memory)}"
                           + (f", {far[n.node_id]}, tried last)" if n.node_id in far else ")")
                           for n in usable)
    if needed > lent:
        head = (f"split across the {len(chain)} usable nodes it needs {format_size(needed)}, they "
                f"lend {format_size(lent)}: {format_size(needed - lent)} missing")
    else:  # enough in total, but layer granularity or the pins defeat every split
        head = (f"the usable nodes lend {format_size(lent)}, enough for the {format_size(needed)} it "
                f"needs, but no split into contiguous layer ranges{' and the pins' * bool(p.pins)} "
                "fits each node")
    return PlanError(f"the model does not fit: {head}. Considered: {considered}. Left out: {gone}. "
                     "Add a node or lend more memory (resources.max_memory).")
