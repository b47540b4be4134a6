"""Chaos trials of the serving path: a stage SIGKILLed mid-stream on a busy machine.

Owns what the chaos test (tests/integration/test_chaos.py) and scripts/bench_chaos.py
share: ``cpu_hog`` (one busy-looping process per core, always killed), ``ChaosModel`` (a
GGUF model with what each node lends and the layer ranges of its three-node plan) and
``journey``: one trial end to end. Four real daemons start (three for the plan and a
spare, each lending so that any three hold the model), one of them (the importer) pulls
the GGUF file, the model is loaded with /api/load pins that put the importer at the
chosen position of the chain, two different entry nodes stream a greedy generation at
once, and once both streams are under way one stage of the plan that is not the importer
gets SIGKILL. The trial records, per stream, whether it completed, its text and its
longest pause; whether the texts equal the undisturbed run's; how long the drivers took
to re-plan; and every failure as a message. A trial never raises: whatever went wrong is
in ``TrialResult.errors`` (with what the daemons' logs said about it), and every daemon,
namespace and socket it made is gone when it returns.

``netns=True`` runs the daemons in network namespaces on a bridge (node/testing/netns.py)
with ``netem`` on each host's link: tc netem where the kernel has sch_netem, else the same
delay, loss and rate from the userspace impaired bridge (node/testing/impair.py;
``TrialResult.shaping`` says which); callers check ``impairment_unusable_reason()`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node.testing.localcluster import LocalCluster, LocalNode
from node.testing.netns import Impairment, lan
from node.testing.streams import (
    Stream,
    StreamResult,
    failure,
    post_lines,
    run_streams,
)

__all__ = ["NETEM", "ChaosModel", "StreamResult", "TrialResult", "cpu_hog", "journey", "prepare_model"]

NETEM = "delay 5ms loss 1% rate 100mbit"
NODES = 4  # three in the plan and a spare
STAGES = 3
KILL_AFTER = 16  # lines each stream has received before the kill: mid-stream
_HOG = ("import os, sys\nparent = int(sys.argv[1])\n"
        "while os.getppid() == parent:\n    for _ in range(200000):\n        pass\n")


# ---------------------------------------------------------------------- the busy machine

@contextlib.contextmanager
def cpu_hog(processes: int | None = None) -> Iterator[list[int]]:
    """One busy-looping process per core (``processes``: how many) for the duration of the
    block; they are killed when it ends, however it ends, and each also stops by itself
    once this process is gone. Yields their pids."""
    count = processes if processes is not None else len(os.sched_getaffinity(0))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", _HOG, str(os.getpid())],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


# ---------------------------------------------------------------------- the model

@dataclass(frozen=True)
class ChaosModel:
    """A GGUF model ready for trials: what to pull, what each node lends, the plan's ranges."""

    name: str  # the name the importer pulls it under
    gguf: Path
    config_dir: Path  # config.json and the tokenizer files the GGUF implies
    engine: Mapping[str, Any]  # each daemon's [engine] settings
    lend: int  # bytes each node lends: any three of four hold the model, two do not
    ranges: tuple[tuple[int, int], ...]  # the three stages' layers in chain order
    prompts: tuple[str, str]  # one per entry node
    raw: bool  # prompts go in as they are (no chat template)
    num_predict: int
    piece_size: int
    real: bool  # a trained model (SmolLM2), not random weights


def prepare_model(root: Path, kind: str = "tiny", *, num_predict: int = 120) -> ChaosModel:
    """Make (``tiny``: a 6-layer random Qwen2 written as a Q8_0 GGUF) or fetch (``smollm2``:
    the catalogue's SmolLM2-135M-Instruct; node.gguf.catalog.CatalogError when it cannot)
    the model, and compute what each node lends and the ranges of its plan (XLA's memory
    analysis: seconds)."""
    from node.gguf.sidecar import write_sidecars

    root.mkdir(parents=True, exist_ok=True)
    engine: dict[str, Any] = {"max_context": 256, "max_sessions": 4, "queue": 2, "step_timeout": 20.0,
                              "compute_dtype": "float32"}
    if kind == "tiny":
        from node.testing.gguf_writer import write_gguf
        from node.testing.tinymodel import make_tiny_model

        src = make_tiny_model(root / "tiny-src", arch="qwen2", layers=6, hidden=64, intermediate=128,
                              vocab_size=512)
        gguf = write_gguf(src, root / "chaos-tiny.gguf", qtype="Q8_0")
        engine["prefill_chunk"] = 32
        name, prompts, raw, piece, real = "chaos-tiny", ("el perro come", "la casa azul"), True, 16 * 1024, False
    elif kind == "smollm2":
        from node.gguf.catalog import fetch, lookup

        entry = lookup("smollm2:135m")
        assert entry is not None
        gguf = fetch(entry)
        engine["prefill_chunk"] = 64
        name, raw, piece, real = "chaos-smollm2", False, 256 * 1024, True
        prompts = ("Write a long story about a dragon who learns to cook.",
                   "Explain in detail how a bicycle works, part by part.")
    else:
        raise ValueError(f"model must be tiny or smollm2, got {kind!r}")
    config_dir = write_sidecars(gguf, root / f"{name}-config")
    lend, ranges = _lend_and_ranges(config_dir, engine)
    return ChaosModel(name, Path(gguf), config_dir, dict(engine), lend, ranges, prompts, raw, num_predict, piece,
                      real)


def _lend_and_ranges(config_dir: Path, engine: Mapping[str, Any]) -> tuple[int, tuple[tuple[int, int], ...]]:
    """What each of the four nodes lends (plans.lend_with_spare) and the ranges the planner
    gives three nodes lending that: every node lends the same, so any assignment of these
    ranges to any three of them fits."""
    from node.engine import load_config
    from node.pipeline.cost import model_cost
    from node.pipeline.planner import NodeOffer, make_plan
    from node.testing.plans import lend_with_spare

    config: Any = load_config(config_dir)
    context = min(int(engine["max_context"]), int(config.max_position_embeddings or engine["max_context"]))
    slots, chunk = int(engine["max_sessions"]), int(engine["prefill_chunk"])
    lend = lend_with_spare(config_dir, NODES, context=context, slots=slots, prefill_chunk=chunk)
    with ThreadPoolExecutor(1) as pool:
        cost = asyncio.run(model_cost(pool, config, "float32", context, slots, chunk))
    plan = make_plan(cost, [NodeOffer(f"{i:064x}", f"n{i}", lend, 1.0) for i in range(STAGES)])
    ranges = tuple((s.start, s.end) for s in plan.stages)
    if len(ranges) != STAGES:
        raise ValueError(f"lending {lend} bytes, the planner used {len(ranges)} nodes, not {STAGES}")
    return lend, ranges


# ---------------------------------------------------------------------- records

@dataclass
class TrialResult:
    """What one journey did and saw (``errors`` empty and ``ok`` true when all held)."""

    trial: int
    model: str
    netns: bool
    spare_holds: bool
    shaping: str = "none"  # what impaired the links: "none", "netem" or "userspace" (the bridge process)
    importer: str = ""
    position: int = 0  # the importer's place in the chain
    victim: str = ""
    victim_position: int | None = None
    spare: str = ""
    entries: list[str] = field(default_factory=list)
    plan_before: list[dict[str, Any]] = field(default_factory=list)  # the pinned plan, once loaded
    plan_at_kill: list[dict[str, Any]] = field(default_factory=list)  # what /api/ps showed just before the kill
    plan_after: list[dict[str, Any]] = field(default_factory=list)
    streams: list[StreamResult] = field(default_factory=list)
    undisturbed: dict[str, str] = field(default_factory=dict)  # prompt -> the text without a kill
    completed: bool = False
    identical: bool = False
    dead_out_of_plan: bool = False
    killed_mid_stream: bool = False
    replan_s: float | None = None  # the slowest entry driver's "recovered" seconds (its daemon.log)
    replan_seen_s: float | None = None  # from the kill until /api/ps showed a plan without the victim
    errors: list[str] = field(default_factory=list)
    log_notes: list[str] = field(default_factory=list)  # warnings and errors in the daemons' logs after the kill
    notes: list[str] = field(default_factory=list)  # what went oddly without failing the trial
    seconds: float = 0.0
    root: str = ""

    @property
    def ok(self) -> bool:
        return self.completed and self.identical and self.dead_out_of_plan and not self.errors

    @property
    def plan_moved(self) -> bool:
        """The plan changed between the pinned load and the kill (no node had died)."""
        return bool(self.plan_at_kill) and _layout(self.plan_at_kill) != _layout(self.plan_before)

    @property
    def pause_s(self) -> float:
        return max((s.pause_s for s in self.streams), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["streams"] = [s.to_dict() for s in self.streams]
        out["ok"], out["pause_s"], out["plan_moved"] = self.ok, self.pause_s, self.plan_moved
        return out


def _layout(plan: list[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
    return [(s["node"], s["start"], s["end"]) for s in plan]


def _plan_moves(cluster: LocalCluster, nodes: list[LocalNode], model: ChaosModel, res: TrialResult,
                since: Mapping[str, int]) -> bool:
    """Read the plan that serves now into ``res.plan_at_kill``; when it is not the pinned
    one (no node has died yet), note who planned what since the load, from their logs."""
    with contextlib.suppress(OSError, ValueError):
        res.plan_at_kill = _plan(cluster, nodes[0], model.name)[1]
    if not res.plan_moved:
        return False
    moves = [_note(n, rec) for n in nodes for rec in _log_events(n, since[n.root.name])
             if rec.get("event") in ("planned", "plan_needs_repair")]
    res.notes.append(f"the plan changed with every node alive: pinned {_layout(res.plan_before)}, then "
                     f"{_layout(res.plan_at_kill)}; " + "; ".join(moves))
    return True


# ---------------------------------------------------------------------- HTTP

# ---------------------------------------------------------------------- logs and plans

def _log_size(node: LocalNode) -> int:
    try:
        return node.log_path.stat().st_size
    except OSError:
        return 0


def _log_events(node: LocalNode, since: int) -> list[dict[str, Any]]:
    try:
        with node.log_path.open("rb") as fh:
            fh.seek(since)
            data = fh.read()
    except OSError:
        return []
    out = []
    for raw in data.splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(raw)
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _note(node: LocalNode, rec: Mapping[str, Any]) -> str:
    fields = {k: v for k, v in rec.items() if k not in ("timestamp", "level", "logger", "event")}
    return f"{node.root.name} daemon.log: {rec.get('level', '?')} {rec.get('event', '?')} {json.dumps(fields)[:400]}"


def _plan(cluster: LocalCluster, node: LocalNode, model: str) -> tuple[int | None, list[dict[str, Any]]]:
    """(epoch, [{node, node_id, start, end}]) of ``model`` as the node's /api/ps shows it."""
    for m in cluster.get(node, "/api/ps").get("models") or []:
        if str(m.get("name", "")).split(":")[0] == model or str(m.get("model", "")).split(":")[0] == model:
            return m.get("epoch"), [{"node": s.get("node"), "node_id": s.get("node_id"), "start": s.get("start"),
                                     "end": s.get("end")} for s in m.get("plan") or []]
    return None, []


# ---------------------------------------------------------------------- one trial

def journey(root: Path, model: ChaosModel, *, position: int = 0, spare_holds: bool = True,
            victim_position: int | None = None, seed: int | None = None,
            reference: Mapping[str, str] | None = None, netns: bool = False, netem: str | None = NETEM,
            trial: int = 0, kill_after: int = KILL_AFTER, timeout: float = 600.0,
            env: Mapping[str, str] | None = None, compile_cache: Path | None = None,
            record_ttl: float | None = None, say: Callable[[str], None] | None = None) -> TrialResult:
    """One trial (the module docstring says what it does). ``position``: the importer's
    place in the chain (0, 1, 2); ``spare_holds``: the spare pulls the whole model before
    the kill (else it must fetch the dead stage's pieces after it); ``victim_position``:
    which stage dies (default: a random one that is not the importer); ``seed``: the
    random choices (which node imports, which two are the entries); ``reference``: the
    undisturbed texts by prompt (default: the same prompts run first on this cluster, no
    kill); ``netns``: the daemons in namespaces with ``netem`` on every link (None: none;
    without sch_netem only its delay, loss and rate, from the userspace bridge);
    ``record_ttl``: the DHT records' lifetime (default LocalCluster's, short, as in every
    integration test); ``timeout``: the whole trial's bound, each wait inside it bounded too."""
    rng = random.Random(seed)
    t0 = time.monotonic()
    deadline = t0 + timeout
    res = TrialResult(trial, model.name, netns, spare_holds, position=position, root=str(root))
    say = say or (lambda _msg: None)
    root.mkdir(parents=True, exist_ok=True)
    base_env = {"PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2",
                "XDG_CACHE_HOME": str(root / "xdg-cache"), **(env or {})}
    try:
        with contextlib.ExitStack() as stack:
            hosts: list[Any] = [None] * NODES
            if netns:
                net = stack.enter_context(lan(NODES, f"10.91.{trial % 250}", f"c{trial % 100}",
                                              Impairment.from_netem(netem, seed=trial) if netem else None))
                hosts, res.shaping = list(net.hosts), net.shaping
            cluster = stack.enter_context(LocalCluster(root / "cluster", env=base_env, compile_cache=compile_cache))
            if record_ttl is not None:
                cluster.record_ttl = record_ttl
            try:
                _trial(cluster, hosts, model, res, rng, deadline, reference=reference,
                       victim_position=victim_position, kill_after=kill_after, say=say)
            except Exception as exc:  # a trial never raises: the message goes in the record
                res.errors.append(f"{type(exc).__name__}: {exc}")
            if res.errors and not res.log_notes:  # what the daemons said, where they said it
                res.log_notes = [_note(n, rec) for n in cluster.nodes for rec in _log_events(n, 0)
                                 if rec.get("level") in ("warning", "error", "critical")]
                res.errors.extend(res.log_notes[:12])
    except Exception as exc:  # setting up or tearing down namespaces
        res.errors.append(f"{type(exc).__name__}: {exc}")
    res.seconds = round(time.monotonic() - t0, 1)
    return res


def _left(deadline: float, most: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the trial ran out of time")
    return min(most, left)


def _trial(cluster: LocalCluster, hosts: list[Any], model: ChaosModel, res: TrialResult, rng: random.Random,
           deadline: float, *, reference: Mapping[str, str] | None, victim_position: int | None, kill_after: int,
           say: Callable[[str], None]) -> None:
    config = {"resources": {"max_memory": model.lend}, "engine": dict(model.engine)}
    first = cluster.add_node(config=config, host=hosts[0])
    cluster.start(first, timeout=_left(deadline, 180))
    rest = [cluster.add_node(config=config, host=h) for h in hosts[1:]]
    failures: list[BaseException] = []

    def start(node: LocalNode) -> None:
        try:
            cluster.start(node, timeout=_left(deadline, 180))
        except BaseException as exc:
            failures.append(exc)

    starters = [threading.Thread(target=start, args=(n,), daemon=True) for n in rest]
    for th in starters:
        th.start()
    for th in starters:
        th.join(_left(deadline, 200))
    if failures:
        raise failures[0]
    cluster.wait_converged(timeout=_left(deadline, 120))
    nodes = list(cluster.nodes)
    say(f"{len(nodes)} daemons up: " + ", ".join(f"{n.root.name} pid {n.proc.pid if n.proc else '-'}"
                                               for n in nodes))

    # Who does what: the importer at res.position, the victim a stage that is not the importer.
    importer = rng.choice(nodes)
    others = [n for n in nodes if n is not importer]
    rng.shuffle(others)
    chain = others[:STAGES - 1]
    chain.insert(res.position, importer)
    spare = others[STAGES - 1]
    stages_other = [i for i in range(STAGES) if i != res.position]
    vpos = victim_position if victim_position is not None else rng.choice(stages_other)
    if vpos == res.position:
        raise ValueError(f"the victim must not be the importer (position {vpos})")
    victim = chain[vpos]
    entries = rng.sample([n for n in nodes if n is not victim], 2)
    res.importer, res.victim, res.victim_position, res.spare = (importer.root.name, victim.root.name, vpos,
                                                                spare.root.name)
    res.entries = [n.root.name for n in entries]

    # The importer pulls the GGUF; the load pins each stage of the chain to its range.
    status, lines = post_lines(cluster, importer, "/api/pull", {"model": str(model.gguf), "name": model.name,
                                                                 "piece_size": model.piece_size},
                                timeout=_left(deadline, 300))
    if (msg := failure(f"pull of {model.gguf.name} on {importer.root.name}", status, lines)) is not None:
        raise RuntimeError(msg)
    pins = [{"node": n.root.name, "layers": list(r)} for n, r in zip(chain, model.ranges, strict=True)]
    say(f"load pinned {pins}")
    status, lines = post_lines(cluster, entries[0], "/api/load", {"model": model.name, "pins": pins},
                                timeout=_left(deadline, 400))
    if (msg := failure(f"load through {entries[0].root.name} with pins {pins}", status, lines)) is not None:
        raise RuntimeError(msg)
    _, res.plan_before = _plan(cluster, entries[0], model.name)
    loaded_at = {n.root.name: _log_size(n) for n in nodes}
    for n in nodes:  # every node should show the one published plan (issue 19, item 8)
        with contextlib.suppress(OSError, ValueError):
            seen = _plan(cluster, n, model.name)[1]
            if _layout(seen) != _layout(res.plan_before):
                res.notes.append(f"after the load, {n.root.name}'s /api/ps showed {_layout(seen)}, "
                                 f"not the plan {_layout(res.plan_before)}")
    if res.spare_holds:
        status, lines = post_lines(cluster, spare, "/api/pull", {"model": model.name}, timeout=_left(deadline, 300))
        if (msg := failure(f"pull of {model.name} on the spare {spare.root.name}", status, lines)) is not None:
            raise RuntimeError(msg)
    say(f"plan {res.plan_before}, spare {spare.root.name} holds the pieces: {res.spare_holds}")

    # The undisturbed texts, unless given: the same prompts through the same entries, no kill.
    if reference is None:
        quiet = run_streams(cluster, entries, model, time.monotonic() + _left(deadline, 300))
        bad = [f"undisturbed stream through {s.entry}: {s.error or 'did not complete'}" for s in quiet
               if not s.completed]
        if bad:
            res.errors.extend(bad)
            res.streams = quiet
            _plan_moves(cluster, nodes, model, res, loaded_at)
            return
        reference = {s.prompt: s.text for s in quiet}
        say(f"undisturbed: {[s.lines for s in quiet]} lines, pauses {[s.pause_s for s in quiet]} s")
    res.undisturbed = dict(reference)

    offsets = {n.root.name: 0 for n in nodes}
    killed_at: list[float] = []
    by_name = {n.root.name: n for n in nodes}

    def kill(streams: list[Stream]) -> None:
        nonlocal victim
        wait_until = time.monotonic() + _left(deadline, 240)
        while time.monotonic() < wait_until:
            if all(len(s.result.times) >= kill_after for s in streams) or any(not s.is_alive() for s in streams):
                break
            time.sleep(0.02)
        # The plan that serves now: another driver may have moved it since the pinned load.
        if _plan_moves(cluster, nodes, model, res, loaded_at):
            staged = [s["node"] for s in res.plan_at_kill]
            if victim.root.name not in staged:
                spared = {importer.root.name, *(e.root.name for e in entries)}
                candidates = [name for name in staged if name not in spared and name in by_name]
                if not candidates:
                    res.errors.append(f"no stage to kill: the plan at the kill ({_layout(res.plan_at_kill)}) holds "
                                      "only the importer and the entry nodes")
                    return
                victim = by_name[candidates[0]]
            res.victim, res.victim_position = victim.root.name, staged.index(victim.root.name)
        for n in nodes:
            offsets[n.root.name] = _log_size(n)
        for s in streams:
            s.result.lines_at_kill = len(s.result.times)
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())
        say(f"SIGKILL {victim.root.name} (pid {victim.proc.pid}, stage {res.victim_position}) at lines "
            f"{[s.result.lines_at_kill for s in streams]}")
        # Watch a survivor's /api/ps for the plan without the victim while the streams go on.
        while any(s.is_alive() for s in streams) and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                _, plan = _plan(cluster, importer, model.name)
                if plan and all(s["node"] != victim.root.name for s in plan):
                    res.replan_seen_s = round(time.monotonic() - killed_at[0], 2)
                    return
            time.sleep(0.25)

    res.streams = run_streams(cluster, entries, model, time.monotonic() + _left(deadline, 400), kill=kill)
    if not killed_at:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        victim.proc.wait(10)  # type: ignore[union-attr]
    res.killed_mid_stream = any(s.lines_at_kill is not None and (s.lines > s.lines_at_kill or not s.completed)
                                for s in res.streams)
    for s in res.streams:
        if not s.completed:
            res.errors.append(f"stream through {s.entry}: {s.error or 'did not complete'}")
        elif s.text != reference.get(s.prompt):
            want = reference.get(s.prompt, "")
            at = next((i for i, (a, b) in enumerate(zip(s.text, want, strict=False)) if a != b),
                      min(len(s.text), len(want)))
            res.errors.append(f"stream through {s.entry}: the text differs from the undisturbed run's from "
                              f"character {at}: got {s.text[at:at + 60]!r}, want {want[at:at + 60]!r}")
    res.completed = all(s.completed for s in res.streams)
    res.identical = res.completed and all(s.text == reference.get(s.prompt) for s in res.streams)

    # The new plan, from a survivor; then what the drivers' logs say about the recovery.
    try:
        cluster.wait_until(lambda: bool(_plan(cluster, entries[0], model.name)[1]), _left(deadline, 30),
                           "a plan in /api/ps")
        _, res.plan_after = _plan(cluster, entries[0], model.name)
    except (TimeoutError, OSError) as exc:
        res.errors.append(f"no plan in /api/ps after the kill: {exc}")
    res.dead_out_of_plan = bool(res.plan_after) and all(s["node"] != victim.root.name for s in res.plan_after)
    if res.plan_after and not res.dead_out_of_plan:
        res.errors.append(f"the plan after the kill still names {victim.root.name}: {res.plan_after}")
    seconds = []
    for n in nodes:
        if n is victim:
            continue
        for rec in _log_events(n, offsets[n.root.name]):
            if rec.get("event") == "recovered" and isinstance(rec.get("seconds"), int | float):
                seconds.append(float(rec["seconds"]))
            if rec.get("level") in ("warning", "error", "critical"):
                res.log_notes.append(_note(n, rec))
    res.replan_s = max(seconds) if seconds else None
    if res.errors:  # say what the daemons said about it, where they said it
        res.errors.extend(res.log_notes[:12])
        res.log_notes = res.log_notes or ["(no warning or error in the daemons' logs after the kill)"]

