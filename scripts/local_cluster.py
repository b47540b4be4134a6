#!/usr/bin/env python3
"""Start a local multi-node enjambre cluster on this machine (loopback) and show it.

    python scripts/local_cluster.py [--nodes 3] [--dir DIR] [--keep]

Every node is a real `nodectl serve` daemon with its own config, key and data dir;
they find each other through the DHT and talk over mutual TLS. Without --keep the
nodes are stopped cleanly (SIGTERM) at the end.
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
    args = p.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="enjambre-demo-"))
    print(f"starting {args.nodes} nodes under {root} ...", flush=True)
    t0 = time.monotonic()
    with LocalCluster(root) as cluster:
        cluster.launch(args.nodes)
        cluster.wait_converged(timeout=60)
        print(f"all {args.nodes} nodes see each other after {time.monotonic() - t0:.1f}s\n", flush=True)
        first = cluster.nodes[0]
        nodectl = [sys.executable, "-m", "node.cli"]
        env = {**os.environ, "ENJAMBRE_CONFIG": str(first.config)}
        print("$ nodectl status", flush=True)
        subprocess.run([*nodectl, "status"], env=env, check=True)
        for other in cluster.nodes[1:]:
            print(f"\n$ nodectl ping {other.node_id[:12]}", flush=True)
            subprocess.run([*nodectl, "ping", other.node_id[:12]], env=env, check=True)
        # A model enters the cluster once, on one node, and the others fetch it from their peers.
        from node.testing.tinymodel import make_tiny_model

        model = make_tiny_model(root / "tiny-model", arch="qwen2", layers=4)
        print(f"\n$ nodectl pull {model}   (on {first.config.parent.name})", flush=True)
        subprocess.run([*nodectl, "pull", str(model), "--piece-size", "64KiB"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        time.sleep(1.5)  # the holder's records spread
        for other in cluster.nodes[1:]:
            print(f"$ nodectl pull tiny-model   (on {other.config.parent.name})", flush=True)
            subprocess.run([*nodectl, "pull", "tiny-model"], env={**os.environ, "ENJAMBRE_CONFIG": str(other.config)},
                           check=True, stdout=subprocess.DEVNULL)
        print("\n$ nodectl list", flush=True)
        subprocess.run([*nodectl, "list"], env=env, check=True)
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
