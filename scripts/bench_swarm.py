#!/usr/bin/env python3
"""Benchmark the swarm: piece transfer on loopback, replication across rate-limited namespaces.

    python scripts/bench_swarm.py [--json] [--size-mb 200] [--counts 2,4,6,8] [--rate-mbit 100]

1. Loopback, in one process: one node fetches a synthetic model from another over
   the real transport (TLS, hashing, the store on disk), next to the transport's own
   bulk MB/s measured between the same two nodes (target: >= 0.7x).
2. As root: N network namespaces on a bridge, each node's egress capped with tc;
   one seed imports a synthetic model of S bytes and the other N-1 pull it. The
   time until all hold a full replica, in link-times (S / link rate), with peers
   serving what they fetched, and with ``swarm.share = false`` (everyone fetches
   from the seed only, which needs about N-1). Target: <= 1.5 at N = 8.
3. Layer ranges: 4 nodes each fetch a quarter of a model's layers; bytes each
   received over the bytes its layers need (target: <= 1.05).
JSON keys: loopback_mb_s, transport_mb_s, replicate_ratio, seed_only_ratio, range_overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from safetensors.numpy import save_file

from node.config import update_config
from node.identity import ClusterKeys, NodeKey, generate_secret, parse_secret
from node.net.transport import Transport
from node.store.importer import import_directory
from node.store.models import ModelStore
from node.swarm.fetcher import PieceFetcher
from node.swarm.layers import pieces_for_layers
from node.swarm.server import PieceServer
from node.system.counters import Counters
from node.testing.netns import Host, bridged_hosts, netns_unusable_reason

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def synthetic_model(path: Path, size: int, layers: int = 8) -> Path:
    """A Llama-named checkpoint of random bytes, about ``size`` bytes, split in layers."""
    path.mkdir(parents=True, exist_ok=True)
    per = size // (layers + 2)
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.integers(0, 255, per, np.uint8),
               "lm_head.weight": rng.integers(0, 255, per, np.uint8)}
    for i in range(layers):
        tensors[f"model.layers.{i}.mlp.weight"] = rng.integers(0, 255, per, np.uint8)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers}))
    return path


# ---------------------------------------------------------------------------------------------- loopback


async def loopback(size: int, piece: int) -> tuple[float, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-swarm-"))
    model = synthetic_model(tmp / "m", size)
    cluster = ClusterKeys.from_secret(parse_secret(generate_secret()))
    seed_store, copy_store = ModelStore(tmp / "seed", reserve=0), ModelStore(tmp / "copy", reserve=0)
    manifest = import_directory(seed_store, model, name="m", piece_size=piece)
    a = Transport(NodeKey.generate(), cluster, name="a", software_version="bench")
    b = Transport(NodeKey.generate(), cluster, name="b", software_version="bench")
    PieceServer(seed_store, Counters()).register(a)
    blob = os.urandom(piece)

    async def echo(_: Any, body: Any) -> Any:
        return blob

    a.on_request("bulk", echo)
    await a.start("127.0.0.1", 0)
    try:
        conn = await b.connect("127.0.0.1", a.port or 0)
        start = time.perf_counter()
        for _ in range(size // piece):  # the transport alone: the same bytes, 4 in flight
            await asyncio.gather(*(conn.request("bulk", None) for _ in range(4)))
        transport_mb_s = 4 * (size // piece) * piece / (time.perf_counter() - start) / 1e6
        copy_store.add(manifest)

        async def ask(_: str, body: dict[str, object]) -> bytes:
            data = await conn.request("swarm.piece", body)
            assert isinstance(data, bytes)
            return data

        async def holders() -> dict[str, set[int]]:
            return {"a": set(range(manifest.num_pieces))}

        fetcher = PieceFetcher(copy_store, manifest, ask=ask, holders=holders, counters=Counters())
        start = time.perf_counter()
        await fetcher.run(set(range(manifest.num_pieces)))
        loopback_mb_s = manifest.total_size / (time.perf_counter() - start) / 1e6
    finally:
        await b.close()
        await a.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return loopback_mb_s, transport_mb_s


# ---------------------------------------------------------------------------------------------- namespaces


class Nodes:
    """N daemons in N namespaces, each node's egress capped at ``rate_mbit``."""

    def __init__(self, hosts: list[Host], tmp: Path, rate_mbit: int, share: bool) -> None:
        self.hosts, self.tmp, self.share = hosts, tmp, share
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "ENJAMBRE_BENCH_SECONDS": "0.2",
                    "XDG_CACHE_HOME": str(tmp / "cache")}
        self.configs: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        for i, host in enumerate(hosts):
            subprocess.run(host.command("tc", "qdisc", "replace", "dev", f"v{i}", "root", "tbf", "rate",
                                        f"{rate_mbit}mbit", "burst", "256kb", "latency", "100ms"), check=True)

    def nodectl(self, i: int, *args: str) -> str:
        out = subprocess.run(self.hosts[i].command(sys.executable, "-m", "node.cli", *args, "--config",
                                                   str(self.configs[i])),
                             capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"nodectl {args[0]} on node {i}: {out.stderr[-2000:]}")
        return out.stdout

    def start(self) -> None:
        for i, host in enumerate(self.hosts):
            cfg = self.tmp / f"n{i}" / "node.toml"
            secret = ["--new-cluster"] if i == 0 else ["--secret-file", str(self.tmp / "secret.txt")]
            bootstrap = [] if i == 0 else ["--bootstrap", f"{self.hosts[0].address}:7421"]
            subprocess.run(host.command(sys.executable, "-m", "node.cli", "init", "--config", str(cfg), "--data-dir",
                                        str(self.tmp / f"n{i}" / "data"), "--name", f"n{i}", "--listen",
                                        host.address, "--no-discovery", *secret, *bootstrap),
                           check=True, capture_output=True, env=self.env, cwd=ROOT)
            self.configs.append(cfg)
            if i == 0:
                (self.tmp / "secret.txt").write_text(self.nodectl(0, "secret"))
                (self.tmp / "secret.txt").chmod(0o600)
            update_config(cfg, {"dht": {"republish_interval": 1.0, "record_ttl": 6.0},
                                "swarm": {"share": self.share}})
        for i, host in enumerate(self.hosts):
            log = (self.configs[i].parent / "daemon.log").open("wb")
            self.procs.append(subprocess.Popen(host.command(sys.executable, "-m", "node.cli", "serve", "--config",
                                                            str(self.configs[i])),
                                               stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                seen = [len(json.loads(self.nodectl(i, "status", "--json"))["nodes"]) for i in range(len(self.hosts))]
            except (RuntimeError, ValueError):
                seen = []
            if seen and all(s == len(self.hosts) for s in seen):
                return
            time.sleep(1)
        raise RuntimeError("the namespace cluster did not form")

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def pull_all(self, *extra: list[str]) -> float:
        start = time.monotonic()
        procs = [subprocess.Popen(self.hosts[i].command(sys.executable, "-m", "node.cli", "pull", "bench", "--json",
                                                        *extra[i - 1] if extra else [], "--config",
                                                        str(self.configs[i])),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env, cwd=ROOT)
                 for i in range(1, len(self.hosts))]
        for proc in procs:
            _, err = proc.communicate(timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"a pull failed: {err.decode()[-2000:]}")
        return time.monotonic() - start

    def metric(self, i: int, name: str) -> float:
        out = subprocess.run(self.hosts[i].command("python3", "-c", "import sys,urllib.request,json;"
                                                   f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{7422}/metrics').read().decode())"),
                             capture_output=True, text=True, timeout=30)
        for line in out.stdout.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0


def replicate(n: int, size: int, rate_mbit: int, share: bool, model: Path, piece: int) -> float:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-swarm-{n}-"))
    with bridged_hosts(n, f"10.79.{n}", f"w{n}{int(share)}") as hosts:
        nodes = Nodes(hosts, tmp, rate_mbit, share)
        try:
            nodes.start()
            nodes.nodectl(0, "pull", str(model), "--name", "bench", "--piece-size", str(piece))
            time.sleep(2.0)
            elapsed = nodes.pull_all()
        finally:
            nodes.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    link_time = size / (rate_mbit * 1e6 / 8)
    return elapsed / link_time


def range_overhead(size: int, rate_mbit: int, model: Path, piece: int) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="bench-swarm-range-"))
    store = ModelStore(tmp / "probe", reserve=0)
    manifest = import_directory(store, model, name="bench", piece_size=piece)
    needs = []
    for q in range(4):
        start, end = 2 * q, 2 * q + 2
        wanted = {t.name for t in manifest.tensors
                  if (t.name.startswith("model.layers.") and start <= int(t.name.split(".")[2]) < end)
                  or (q == 0 and t.name == "model.embed_tokens.weight") or (q == 3 and t.name == "lm_head.weight")}
        needs.append(sum(t.length for t in manifest.tensors if t.name in wanted))
        pieces_for_layers(manifest, start, end, has_embedding=q == 0, has_head=q == 3)
    with bridged_hosts(5, "10.79.20", "r") as hosts:
        nodes = Nodes(hosts, tmp, rate_mbit, True)
        try:
            nodes.start()
            nodes.nodectl(0, "pull", str(model), "--name", "bench", "--piece-size", str(piece))
            time.sleep(2.0)
            nodes.pull_all(*[["--layers", f"{2 * q}:{2 * q + 2}"] for q in range(4)])
            got = [nodes.metric(i, "enjambre_swarm_bytes_fetched_total") for i in range(1, 5)]
        finally:
            nodes.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    return max(g / need for g, need in zip(got, needs, strict=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--size-mb", type=int, default=200)
    p.add_argument("--loopback-mb", type=int, default=256)
    p.add_argument("--counts", default="2,4,6,8")
    p.add_argument("--rate-mbit", type=int, default=100)
    p.add_argument("--piece", type=int, default=4 * MiB)
    p.add_argument("--range-piece", type=int, default=512 * 1024,
                   help="piece size for the layer-range run (pieces much smaller than a layer, as in real models)")
    p.add_argument("--skip-netns", action="store_true")
    args = p.parse_args()
    result: dict[str, Any] = {}
    result["loopback_mb_s"], result["transport_mb_s"] = (round(x, 1) for x in
                                                         asyncio.run(loopback(args.loopback_mb * MiB, args.piece)))
    reason = netns_unusable_reason() if not args.skip_netns else "--skip-netns"
    if reason is None:
        size = args.size_mb * 10**6
        model = synthetic_model(Path(tempfile.mkdtemp(prefix="bench-model-")) / "bench", size)
        counts = [int(x) for x in args.counts.split(",")]
        result["replicate_ratio"] = {n: round(replicate(n, size, args.rate_mbit, True, model, args.piece), 2)
                                     for n in counts}
        result["seed_only_ratio"] = {n: round(replicate(n, size, args.rate_mbit, False, model, args.piece), 2)
                                     for n in counts}
        result["range_overhead"] = round(range_overhead(size, args.rate_mbit, model, args.range_piece), 3)
    else:
        result["netns_skipped"] = reason
    if args.json:
        print(json.dumps(result))
        return 0
    print("swarm benchmark")
    print(f"  loopback piece transfer   {result['loopback_mb_s']:8.1f} MB/s   "
          f"transport bulk {result['transport_mb_s']:.1f} MB/s   "
          f"ratio {result['loopback_mb_s'] / result['transport_mb_s']:.2f} (target >= 0.7)")
    if "replicate_ratio" in result:
        print(f"  {'N':>3}  {'peers serving':>14}  {'seed only':>10}   (link-times; target <= 1.5 at N = 8)")
        for n in result["replicate_ratio"]:
            print(f"  {n:>3}  {result['replicate_ratio'][n]:>14.2f}  {result['seed_only_ratio'][n]:>10.2f}")
        print(f"  layer-range overhead      {result['range_overhead']:.3f} (target <= 1.05)")
    else:
        print(f"  namespaces skipped: {result['netns_skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
