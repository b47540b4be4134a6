#!/usr/bin/env python3
"""Benchmark serving that holds: N chaos trials of the whole journey, on a busy machine.

    python scripts/bench_chaos.py [--trials 20] [--model tiny|smollm2] [--spare-holds] [--spare-fetches]
                                  [--netns] [--json]

Each trial (node/testing/chaos.py's ``journey``) starts four real daemons (three for the
plan and a spare, each lending so that any three hold the model), pulls a GGUF on one node,
loads it across three nodes with that importer at a random position of the chain, streams
two greedy generations through two different entry nodes at once, and SIGKILLs a random
stage that is not the importer mid-stream. A busy-looping process per core runs the whole
time (``--no-hog``: none). ``--netns`` (root): the daemons in network namespaces, every link
shaped with netem (5 ms delay, 1 % loss, 100 Mbit/s; ``--netem`` other settings, ``--netem
none`` unshaped): tc netem where the kernel has sch_netem, else node/testing/impair.py's
userspace bridge (delay, loss and rate only; the table says which).

``--model``: SmolLM2-135M-Instruct from the catalogue (the default when it can be fetched)
or a tiny random GGUF (the fallback, which the script says). ``--spare-holds``: the spare
pulls the model before the kill, so it only compiles (from the persistent XLA cache the
trials share); ``--spare-fetches``: it must fetch the dead stage's pieces first; both (the
default): trials alternate, reported separately. The undisturbed texts are computed once,
by the first trial (the same prompts on its cluster, before its kill), and every trial's
texts are compared with them.

JSON keys: trials, success_rate, identical_text_rate, pause_p50_s, pause_p99_s,
replan_s_p50, errors (each failure's message, with what the daemons logged), and
by_mode (the same numbers per spare mode), model, netns, hog_processes, plan_moved (trials
whose plan changed before the kill with every node alive), trial_records. A pause is a
stream's longest gap between two lines (the worse of a trial's two streams), counted over
trials whose streams both completed; replan is the slowest entry driver's "recovered"
seconds in its daemon.log. Targets (issue 19): success and identical text 100 %; pause p99
under 10 s with the spare holding the pieces, under 20 s when it must fetch them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.testing.chaos import NETEM, ChaosModel, TrialResult, cpu_hog, journey, prepare_model
from node.testing.netns import (
    Impairment,
    impairment_unusable_reason,
    netem_unusable_reason,
    netns_unusable_reason,
)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank: the smallest value with at least p of them at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def summary(results: list[TrialResult]) -> dict[str, Any]:
    n = len(results)
    pauses = [r.pause_s for r in results if r.completed]
    replans = [r.replan_s for r in results if r.replan_s is not None]
    return {
        "trials": n,
        "success_rate": round(sum(r.ok for r in results) / n, 3) if n else None,
        "identical_text_rate": round(sum(r.identical for r in results) / n, 3) if n else None,
        "pause_p50_s": percentile(pauses, 0.5),
        "pause_p99_s": percentile(pauses, 0.99),
        "replan_s_p50": round(statistics.median(replans), 2) if replans else None,
        "plan_moved": sum(r.plan_moved for r in results),
        "errors": [f"trial {r.trial} ({_mode(r)}): {e}" for r in results for e in r.errors],
    }


def _mode(r: TrialResult) -> str:
    return "spare holds" if r.spare_holds else "spare fetches"


def choose_model(kind: str | None, root: Path, tokens: int) -> tuple[ChaosModel, str]:
    """The model and a line saying which (and why, when the default fell back to tiny)."""
    from node.gguf.catalog import CatalogError

    if kind in (None, "smollm2"):
        try:
            model = prepare_model(root, "smollm2", num_predict=tokens)
            return model, "SmolLM2-135M-Instruct (GGUF from the catalogue)"
        except CatalogError as exc:
            if kind == "smollm2":
                raise SystemExit(f"cannot fetch SmolLM2 from the catalogue: {exc}") from None
            why = f"SmolLM2 cannot be fetched ({exc}): using the tiny random model instead"
            return prepare_model(root, "tiny", num_predict=tokens), why
    return prepare_model(root, "tiny", num_predict=tokens), "tiny random model (6 layers, GGUF Q8_0)"


def _fmt(value: float | None, unit: str = " s") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20, help="trials in all (default 20)")
    p.add_argument("--model", choices=("tiny", "smollm2"),
                   help="default: smollm2 when the catalogue can be fetched, else tiny")
    p.add_argument("--spare-holds", action="store_true", help="the spare pulls the model before the kill")
    p.add_argument("--spare-fetches", action="store_true", help="the spare must fetch the dead stage's pieces")
    p.add_argument("--netns", action="store_true", help="daemons in network namespaces with tc netem (root)")
    p.add_argument("--netem", default=NETEM,
                   help=f'with --netns, each link\'s netem settings (default "{NETEM}"; "none": unshaped)')
    p.add_argument("--no-hog", action="store_true", help="no busy-looping process per core")
    p.add_argument("--tokens", type=int, default=120, help="tokens each stream asks for (default 120)")
    p.add_argument("--timeout", type=float, help="seconds one trial may take (default 400 tiny, 900 smollm2)")
    p.add_argument("--seed", type=int, help="the random choices (default: a random seed, printed)")
    p.add_argument("--dir", type=Path, help="where the trials run (kept; default: a temporary dir)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.trials < 1:
        p.error("--trials must be at least 1")
    netem = None if args.netem == "none" else args.netem
    if args.netns and (reason := impairment_unusable_reason() if netem else netns_unusable_reason()) is not None:
        print(f"--netns: {reason}" + (' (--netem none runs the namespaces unshaped)' if netem else ""),
              file=sys.stderr)
        return 2
    if args.netns and netem and (extra := Impairment.from_netem(netem).extra) and netem_unusable_reason():
        print(f"--netns: this kernel has no tc netem, and the userspace bridge applies only delay, loss and "
              f"rate, not {', '.join(extra)}", file=sys.stderr)
        return 2
    modes = [m for m, on in ((True, args.spare_holds), (False, args.spare_fetches)) if on] or [True, False]
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    root.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model, which = choose_model(args.model, root / "model", args.tokens)
    timeout = args.timeout or (900.0 if model.real else 400.0)
    say(f"model: {which}; each node lends {model.lend / 2**20:.1f} MiB, plan ranges {list(model.ranges)}; "
        f"seed {seed}; trials under {root}")
    shared = {"XDG_CACHE_HOME": str(root / "xdg-cache")}
    results: list[TrialResult] = []
    reference: dict[str, str] | None = None
    hog: contextlib.AbstractContextManager[list[int]] = contextlib.nullcontext([]) if args.no_hog else cpu_hog()
    with hog as hogs:
        for i in range(args.trials):
            holds = modes[i % len(modes)]
            position = rng.randrange(3)
            t_dir = root / f"trial{i}"
            r = journey(t_dir, model, position=position, spare_holds=holds, seed=rng.randrange(2**31),
                        reference=reference, netns=args.netns, netem=netem, trial=i, timeout=timeout, env=shared,
                        compile_cache=root / "xla-cache")
            if reference is None and r.undisturbed:
                reference = dict(r.undisturbed)
            results.append(r)
            say(f"trial {i + 1}/{args.trials} ({_mode(r)}): importer {r.importer} at {r.position}, "
                f"killed {r.victim or '-'} at {r.victim_position}, entries {'+'.join(r.entries)}: "
                f"{'ok' if r.ok else 'FAILED'}, pause {r.pause_s:.2f} s, replan {_fmt(r.replan_s)}, "
                f"{r.seconds:.0f} s" + ("" if r.ok else f"\n  {r.errors[0] if r.errors else ''}"))
            if r.ok:
                shutil.rmtree(t_dir, ignore_errors=True)
    out = summary(results)
    by_mode = {("spare_holds" if m else "spare_fetches"): summary([r for r in results if r.spare_holds == m])
               for m in modes}
    for part in by_mode.values():
        part.pop("errors")
    out.update(by_mode=by_mode, model=which, netns=args.netns, netem=netem if args.netns else None,
               hog_processes=len(hogs), seed=seed,
               trial_records=[_record(r) for r in results])
    failed = [r for r in results if not r.ok]
    if args.dir is None and not failed:
        shutil.rmtree(root, ignore_errors=True)
    elif failed:
        say(f"the failed trials' daemon logs are under {root} (trialN/cluster/node*/daemon.log)")
    if args.json:
        print(json.dumps(out))
        return 0
    shaping = results[0].shaping if netem else ""
    place = (f"network namespaces, netem {netem or 'none (unshaped)'}" + (f" via {shaping}" if shaping else "")
             if args.netns else "loopback")
    print(f"chaos benchmark: {len(results)} trials, {which}, {place}, CPU hog of {len(hogs)} processes")
    print(f"  {'mode':<14} {'trials':>6} {'success':>8} {'identical':>9} {'pause p50':>10} {'pause p99':>10} "
          f"{'replan p50':>10} {'plan moved':>10}")
    rows = [*(("spare holds" if k == "spare_holds" else "spare fetches", v) for k, v in by_mode.items()),
            ("all", out)]
    for name, row in rows:
        print(f"  {name:<14} {row['trials']:>6} {_rate(row['success_rate']):>8} {_rate(row['identical_text_rate']):>9} "
              f"{_fmt(row['pause_p50_s']):>10} {_fmt(row['pause_p99_s']):>10} {_fmt(row['replan_s_p50']):>10} "
              f"{row['plan_moved']:>10}")
    print("  targets: success and identical 100%; pause p99 < 10 s (spare holds), < 20 s (spare fetches)")
    if out["errors"]:
        print("errors:")
        for e in out["errors"]:
            print(f"  {e}")
    return 0


def _record(r: TrialResult) -> dict[str, Any]:
    """One trial, short: who did what and what it cost."""
    return {"trial": r.trial, "spare_holds": r.spare_holds, "ok": r.ok, "importer": r.importer,
            "position": r.position, "victim": r.victim, "victim_position": r.victim_position, "entries": r.entries,
            "completed": r.completed, "identical": r.identical, "pause_s": r.pause_s, "replan_s": r.replan_s,
            "replan_seen_s": r.replan_seen_s, "plan_moved": r.plan_moved, "seconds": r.seconds,
            "stream_pauses_s": [s.pause_s for s in r.streams], "shaping": r.shaping, "notes": r.notes}


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    sys.exit(code)
