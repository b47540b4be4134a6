"""``nodectl load``, ``run``, ``ps`` and ``stop``: serving models from a terminal.

``load`` plans a model over the cluster and loads every node's layers (progress per
node); ``run MODEL PROMPT`` loads the model when needed (its progress on stderr), streams
the answer to stdout (``--verbose``: tokens/s, time to first token and the nodes that
served it, on stderr) and ``run MODEL`` on a terminal chats (node/cli_chat.py); ``ps``
lists loaded models with each node's layers; ``stop`` unloads one.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from node.cli_chat import THINK_VALUES, chat, run_once
from node.cli_progress import LoadProgress
from node.cli_progress import clean as _clean
from node.client import CliError, call, stream
from node.system.units import format_size

__all__ = ["add_run_commands"]


def parse_pin(text: str) -> dict[str, Any]:
    """``NODE[:START-END]`` -> a pin of /api/load."""
    node, _, span = text.partition(":")
    if not node:
        raise CliError(f"--pin {text!r}: give a node name or id, e.g. --pin node2:0-6")
    if not span:
        return {"node": node}
    start, dash, end = span.partition("-")
    if not dash or not start.isdigit() or not end.isdigit() or int(start) >= int(end):
        raise CliError(f"--pin {text!r}: the layers are START-END with START < END, e.g. node2:0-6")
    return {"node": node, "layers": [int(start), int(end)]}


def cmd_load(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model}
    if args.weights:
        body["weights"] = args.weights
    if args.pin:
        body["pins"] = [parse_pin(p) for p in args.pin]
    others = LoadProgress(args.model)  # the lines of the events this command has no format of its own for
    for event in stream(args, "POST", "/api/load", body):
        if args.json:
            print(json.dumps(event), flush=True)
        if "error" in event:
            raise CliError(str(event["error"]))
        if args.json:
            continue
        status = event.get("status")
        if status == "planned":
            parts = ", ".join(f"{_clean(s['node'])} [{s['layers'][0]}, {s['layers'][1]})" for s in event["stages"])
            print(f"plan: {parts}", flush=True)
        elif status == "ready":
            print(f"  {_clean(event['node'])}: layers [{event['layers'][0]}, {event['layers'][1]}) ready "
                  f"(load {event.get('load_s') or 0:.1f} s, compile {event.get('compile_s') or 0:.1f} s)", flush=True)
        elif status == "success":
            print(f"{_clean(event['name'])} loaded on {len(event['plan'])} node(s)")
        elif (line := others.feed(event)) is not None:  # waiting, adopted, a pull's progress
            print(f"  {line}", flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.prompt is not None:
        return run_once(args, args.prompt)
    if sys.stdin.isatty():
        return chat(args)
    return run_once(args, sys.stdin.read())


def cmd_ps(args: argparse.Namespace) -> int:
    listing = call(args, "GET", "/api/ps")
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    models = listing.get("models", [])
    if not models:
        print("no models loaded (nodectl load MODEL)")
        return 0
    for m in models:
        print(f"{_clean(m['name'])}  {_clean(m.get('digest', ''), 12)}  {len(m['plan'])} node(s)  "
              f"{format_size(int(m.get('size', 0)))}  context {m.get('context_length')}  "
              f"sessions {m.get('sessions', 0)}  until {_until(m.get('expires_at'))}")
        if m.get("status"):
            print(f"  ({_clean(m['status'], 120)})")
        for s in m["plan"]:
            who = s.get("node") or s["node_id"][:12]
            print(f"  {_clean(who, 32):<12}  layers [{s['start']}, {s['end']})  {format_size(int(s['memory']))}")
    return 0


def _until(expires_at: Any) -> str:
    """Ollama's UNTIL column: "4 minutes from now", "forever"."""
    import datetime as dt

    try:
        when = dt.datetime.strptime(str(expires_at), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return "?"
    left = (when - dt.datetime.now(dt.UTC)).total_seconds()
    if left > 10 * 365 * 86400:
        return "forever"
    if left < 60:
        return "less than a minute from now"
    minutes = round(left / 60)
    return f"{minutes} minute{'s' * (minutes != 1)} from now" if minutes < 120 else f"{round(left / 3600)} hours from now"


def cmd_stop(args: argparse.Namespace) -> int:
    call(args, "POST", "/api/unload", {"model": args.model})
    print(f"{_clean(args.model)} unloaded")
    return 0


def add_run_commands(sub: Any, client: Any) -> None:
    s = sub.add_parser("load", help="plan a model over the cluster and load it")
    client(s)
    s.add_argument("model", help="the model's name or id")
    s.add_argument("--weights", choices=("native", "int8"),
                   help="hold matrices as int8 (a quarter of float32's memory) or native "
                        "(default: the daemon's engine.weights)")
    s.add_argument("--pin", action="append", metavar="NODE[:START-END]",
                   help="place layers by hand: NODE always serves (layers START to END when given); "
                        "repeatable, e.g. --pin node2:0-6 --pin node3")
    s.set_defaults(func=cmd_load, timeout=3600.0)

    s = sub.add_parser("run", help="answer a prompt, or chat on a terminal, with a model (loading it if needed)")
    client(s)
    s.add_argument("model")
    s.add_argument("prompt", nargs="?", help="answer this and exit (default: stdin, or a chat on a terminal)")
    s.add_argument("--verbose", action="store_true", help="timings and nodes on stderr")
    s.add_argument("--temperature", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--num-predict", type=int, help="most tokens to generate (default 256 for a prompt, "
                   "the daemon's for a chat)")
    s.add_argument("--think", nargs="?", const="true", choices=THINK_VALUES,
                   help="ask a reasoning model to think and print its thinking (or low/medium/high)")
    s.add_argument("--hidethinking", action="store_true", help="let the model think but print only the answer")
    s.add_argument("--format", help='ask for this output format ("json")')
    s.add_argument("--keepalive", metavar="DURATION", help='how long the model stays loaded idle ("5m", "1h")')
    s.set_defaults(func=cmd_run, timeout=3600.0)

    s = sub.add_parser("ps", help="the models loaded in the cluster and their plans")
    client(s)
    s.set_defaults(func=cmd_ps)

    s = sub.add_parser("stop", help="unload a model")
    client(s)
    s.add_argument("model")
    s.set_defaults(func=cmd_stop)
