"""Benchmark the sealed DHT: N in-process nodes on 127.0.0.1, lookup latency and hops.

For each N: start N DHTNodes, join each to the first, publish some records from
random nodes, then time lookups from random nodes. "rounds" counts the
iterative lookup's request rounds (each round asks up to alpha nodes; the crawl
runs until the k closest have all answered, merging every publisher's record),
"queried" the nodes asked, "rpc_failures" requests that timed out (a busy host), "first_hit_round" the round in which the first
record arrived (0 when the reader held a copy itself). Compare with ceil(log2 N).

    .venv/bin/python scripts/bench_dht.py --sizes 20,100,200 [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.dht.node import DHTNode
from node.identity import ClusterKeys, NodeKey, generate_secret, parse_secret


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


async def bench_size(
    n: int, *, keys: int, lookups: int, ksize: int, alpha: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    cluster = ClusterKeys.from_secret(parse_secret(generate_secret()))
    nodes: list[DHTNode] = []
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            nodes.append(
                await DHTNode.create(
                    NodeKey.generate(), cluster, host="127.0.0.1", port=0, ksize=ksize, alpha=alpha
                )
            )
        # Join in small concurrent batches, each to the first node (as the beacon would).
        batch = 10
        for i in range(1, n, batch):
            await asyncio.gather(
                *(node.bootstrap([("127.0.0.1", nodes[0].port)]) for node in nodes[i : i + batch])
            )
        join_s = time.perf_counter() - t0

        published: dict[str, str] = {}
        for k in range(keys):
            publisher = rng.choice(nodes)
            key = f"bench/{k}"
            await publisher.put(key, {"k": k}, ttl=600)
            published[key] = publisher.node_id

        latencies: list[float] = []
        rounds: list[int] = []
        first_hit: list[int] = []
        queried: list[int] = []
        found = 0
        for _ in range(lookups):
            reader = rng.choice(nodes)
            key = rng.choice(list(published))
            start = time.perf_counter()
            result = await reader.lookup(key)
            latencies.append((time.perf_counter() - start) * 1000)
            rounds.append(result.rounds)
            first_hit.append(result.first_hit_round)
            queried.append(result.queried)
            found += published[key] in result.records
        peers = [node.peers_known() for node in nodes]
        failures = sum(node.counters["rpc_failures"] for node in nodes)
        return {
            "nodes": n,
            "join_s": round(join_s, 2),
            "lookups": lookups,
            "found": found,
            "p50_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2),
            "rounds_mean": round(statistics.fmean(rounds), 2),
            "rounds_max": max(rounds),
            "first_hit_round_mean": round(statistics.fmean(first_hit), 2),
            "queried_mean": round(statistics.fmean(queried), 1),
            "ceil_log2_n": math.ceil(math.log2(n)),
            "peers_known_mean": round(statistics.fmean(peers), 1),
            "rpc_failures": failures,
        }
    finally:
        for node in nodes:
            await node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="20,100,200", help="comma-separated node counts")
    parser.add_argument("--keys", type=int, default=20, help="records published per run")
    parser.add_argument("--lookups", type=int, default=100, help="timed lookups per run")
    parser.add_argument("--ksize", type=int, default=20)
    parser.add_argument("--alpha", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if any(s < 2 for s in sizes):
        parser.error("every size must be at least 2 nodes")

    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("kademlia").setLevel(logging.ERROR)
    logging.getLogger("rpcudp").setLevel(logging.ERROR)

    rows = [
        asyncio.run(
            bench_size(
                s,
                keys=args.keys,
                lookups=args.lookups,
                ksize=args.ksize,
                alpha=args.alpha,
                seed=args.seed,
            )
        )
        for s in sizes
    ]
    if args.json:
        print(json.dumps({"ksize": args.ksize, "alpha": args.alpha, "results": rows}, indent=2))
        return
    cols = [
        "nodes",
        "join_s",
        "found",
        "lookups",
        "p50_ms",
        "p99_ms",
        "rounds_mean",
        "rounds_max",
        "first_hit_round_mean",
        "ceil_log2_n",
        "queried_mean",
        "peers_known_mean",
        "rpc_failures",
    ]
    print(f"DHT lookups on 127.0.0.1 (k={args.ksize}, alpha={args.alpha})")
    widths = [max(len(c), 6) for c in cols]
    print("  ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(f"{row[c]!s:>{w}}" for c, w in zip(cols, widths, strict=True)))


if __name__ == "__main__":
    main()
