"""``nodectl pull``, ``list``, ``show``, ``cp`` and ``rm``: the cluster's models from a terminal.

``pull`` asks the daemon (``POST /api/pull``) and shows its progress: a bar per
file or model on a terminal (rich), plain lines otherwise. A local directory is
sent as an absolute path (the daemon has its own working directory). With
``--export DIR`` the model's original files are then written to DIR, byte for
byte, streamed from the daemon's verified pieces.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from node.client import CliError, call, download, stream
from node.system.units import format_size, parse_size

__all__ = ["add_model_commands", "render_show", "show_section"]


def _printable(value: Any, limit: int = 48) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in str(value)[:limit])


def cmd_pull(args: argparse.Namespace) -> int:
    source = args.source
    if os.path.exists(source):  # a directory or a GGUF file
        source = str(Path(source).absolute())
    body: dict[str, Any] = {"model": source, "in_place": args.in_place}
    if args.name:
        body["name"] = args.name
    if args.layers:
        try:
            start, end = (int(x) for x in args.layers.split(":"))
        except ValueError:
            raise CliError(f"--layers {args.layers}: write START:END, e.g. 0:8") from None
        body["layers"] = [start, end]
    if args.piece_size:
        try:
            body["piece_size"] = parse_size(args.piece_size)
        except ValueError as exc:
            raise CliError(f"--piece-size: {exc}") from None
    result: dict[str, Any] | None = None
    with _Progress(json_lines=args.json) as show:
        for event in stream(args, "POST", "/api/pull", body):
            if "error" in event:
                raise CliError(str(event["error"]))
            if event.get("status") == "success":
                result = event
            show(event)
    if result is None:
        raise CliError("the daemon stopped answering before the pull finished; see its log")
    if args.export:
        _export(args, str(result.get("name") or result["id"]), Path(args.export))
    if not args.json:
        print(f"{result.get('name', '')} {str(result['id'])[:12]}: ready")
    return 0


def _export(args: argparse.Namespace, name: str, dest: Path) -> None:
    quoted = urllib.parse.quote(name, safe="")
    listing = call(args, "GET", f"/api/models/{quoted}/files")
    for entry in listing["files"]:
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise CliError(f"refusing to write {entry['path']!r} outside {dest}")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        with partial.open("wb") as fh:
            for chunk in download(args, f"/api/models/{quoted}/files/{urllib.parse.quote(entry['path'])}"):
                fh.write(chunk)
        if partial.stat().st_size != entry["size"]:
            partial.unlink()
            raise CliError(f"{entry['path']}: the daemon sent {partial.stat().st_size} bytes of {entry['size']}")
        partial.replace(target)
    if not args.json:
        print(f"exported {len(listing['files'])} files to {dest}")


class _Progress:
    """A rich progress bar on a terminal, one line per change of status elsewhere."""

    def __init__(self, *, json_lines: bool) -> None:
        self.json_lines = json_lines
        self.rich: Any = None
        self.tasks: dict[str, Any] = {}
        self.last = ""

    def __enter__(self) -> _Progress:
        if not self.json_lines and sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.rich = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[peers]}"))
            self.rich.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.rich is not None:
            self.rich.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        status = _printable(event.get("status", ""), 80)
        if self.json_lines:
            print(json.dumps(event), flush=True)
            return
        total, done = event.get("total"), event.get("completed")
        peers = f"{event['peers']} peers" if isinstance(event.get("peers"), int) else ""
        if self.rich is not None and isinstance(total, int) and isinstance(done, int):
            task = self.tasks.get(status)
            if task is None:
                task = self.tasks[status] = self.rich.add_task(status, total=total, peers=peers)
            self.rich.update(task, completed=done, total=total, peers=peers)
            return
        if self.rich is not None:
            self.rich.console.print(status)
        elif status != self.last:
            line = status
            if isinstance(total, int) and isinstance(done, int):
                line += f" ({format_size(done)} of {format_size(total)})"
            print(line, flush=True)
        self.last = status


def cmd_list(args: argparse.Namespace) -> int:
    data = call(args, "GET", "/api/tags")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [["NAME", "ID", "SIZE", "ARCHITECTURE", "PARAMS", "COPIES", "HERE"]]
    for m in data.get("models", []):
        rows.append([
            _printable(m.get("name")), _printable(m.get("digest", ""), 12), format_size(int(m.get("size", 0))),
            _printable(m.get("architecture") or "?", 28), _printable(m["details"].get("parameter_size") or "?", 10),
            str(m.get("copies", 0)), f"{100 * float(m.get('local_share', 0)):.0f}%",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _text(value: Any) -> str:
    # A model's template or license comes from whoever made it: keep lines, drop escapes.
    return "".join(ch if ch.isprintable() or ch in "\n\t" else "?" for ch in str(value))


def show_section(data: dict[str, Any], what: str) -> str:
    """One raw field of /api/show: license, modelfile, template or parameters."""
    return _text(data.get(what) or "").rstrip("\n")


def _context(data: dict[str, Any], most: Any) -> Any:
    """The context the model is loaded with, when it is loaded, beside what it allows."""
    loaded = data.get("context_length")
    if not isinstance(loaded, int) or isinstance(loaded, bool) or loaded == most:
        return most
    return f"{loaded} (loaded; the model allows {most})" if most else loaded


def render_show(data: dict[str, Any], sections: tuple[str, ...] = ("Model", "Capabilities", "Parameters",
                                                                   "License")) -> str:
    """``ollama show``'s summary of an /api/show answer."""
    info, details = data.get("model_info") or {}, data.get("details") or {}
    arch = info.get("general.architecture", "")
    model = [("architecture", arch), ("parameters", details.get("parameter_size")),
             ("context length", _context(data, info.get(f"{arch}.context_length"))),
             ("embedding length", info.get(f"{arch}.embedding_length")),
             ("quantization", details.get("quantization_level"))]
    license_lines = [line for line in _text(data.get("license") or "").splitlines() if line.strip()]
    body = {
        "Model": [f"{k:<20}{_printable(v, 80)}" for k, v in model if v not in (None, "")],
        "Capabilities": [_printable(c) for c in data.get("capabilities") or []],
        "Parameters": [_printable(line, 120) for line in str(data.get("parameters") or "").splitlines()],
        "License": [_printable(line, 120) for line in license_lines[:4]] + (["..."] if len(license_lines) > 4 else []),
    }
    out = []
    for title in sections:
        if body[title]:
            out += [f"  {title}", *(f"    {line}" for line in body[title]), ""]
    return "\n".join(out)


def cmd_show(args: argparse.Namespace) -> int:
    data = call(args, "POST", "/api/show", {"model": args.model})
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.field:
        print(show_section(data, args.field))
    else:
        print(render_show(data))
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    call(args, "POST", "/api/copy", {"source": args.source, "destination": args.destination})
    print(f"copied {_printable(args.source)!r} to {_printable(args.destination)!r}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    result = call(args, "DELETE", "/api/delete", {"model": args.name})
    if result.get("remaining"):
        print(f"removed the name {args.name}; model {str(result['id'])[:12]} stays as "
              f"{', '.join(_printable(n) for n in result['remaining'])}")
        return 0
    if result.get("last_copy_pieces"):
        print(f"warning: this node held the only copy of {result['last_copy_pieces']} pieces of "
              f"{args.name}; they are gone from the cluster", file=sys.stderr)
    print(f"removed {args.name} ({str(result['id'])[:12]}) from this node")
    return 0


def add_model_commands(sub: Any, client: Any) -> None:
    s = sub.add_parser("pull", help="import a model (a directory, a GGUF file, ollama:NAME, hf:org/repo, "
                       "a catalogue name like smollm2:135m) or fetch one from the cluster")
    client(s)
    s.add_argument("source", help="a model directory, a .gguf file, ollama:NAME[:TAG] (a local Ollama store), "
                   "hf:org/repo[@revision], a catalogue name (smollm2:135m), or a model name or id in the cluster")
    s.add_argument("--name", help="name it (default: the directory or file name, tag latest)")
    s.add_argument("--piece-size", help='size of the verified pieces, e.g. "4MiB" (default: swarm.piece_size)')
    s.add_argument("--in-place", action="store_true", help="serve the files where they are instead of copying")
    s.add_argument("--export", metavar="DIR", help="then write the model's original files to DIR")
    s.add_argument("--layers", metavar="START:END", help="fetch only what serving layers START..END-1 needs")
    s.set_defaults(func=cmd_pull, timeout=3600.0)

    s = sub.add_parser("list", help="the models in the cluster")
    client(s)
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="a model's architecture, parameters, template and license")
    client(s)
    s.add_argument("model", help="the model's name or id")
    field = s.add_mutually_exclusive_group()
    for what in ("license", "modelfile", "template", "parameters"):
        field.add_argument(f"--{what}", dest="field", action="store_const", const=what, help=f"print only the {what}")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("cp", help="give a model another name")
    client(s)
    s.add_argument("source", help="the model's name or id")
    s.add_argument("destination", help="the new name (name[:tag])")
    s.set_defaults(func=cmd_cp, timeout=120.0)

    s = sub.add_parser("rm", help="remove a model's pieces from this node (or only a name, if it has others)")
    client(s)
    s.add_argument("name", help="the model's name or id")
    s.set_defaults(func=cmd_rm)
