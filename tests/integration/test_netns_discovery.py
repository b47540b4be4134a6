"""Discovery across real network namespaces: beacon multicast on a bridge, then DHT lookups.

Builds a private "hub" namespace holding a bridge and three node namespaces
joined to it by veth pairs, with 10.77.0.x addresses that exist only inside
those namespaces (the host's interfaces and routes are never touched). Each
node namespace runs a small Python process with a Beacon and a DHTNode that has
NO bootstrap peers: they must find each other through the beacon. Everything is
deleted in a ``finally``. Skipped unless root with a working ``ip netns``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from node.identity import generate_secret
from node.testing.netns import Host, bridged_hosts, netns_unusable_reason

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
N = 3

NODE_CODE = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from node.cluster.directory import publish_member, read_members
    from node.dht.node import DHTNode
    from node.net.discovery import Beacon
    from node.identity import ClusterKeys, NodeKey, parse_secret

    async def main():
        i, addr = int(sys.argv[1]), sys.argv[2]
        cluster = ClusterKeys.from_secret(parse_secret(os.environ["ENJ_SECRET"]))
        key = NodeKey.generate()
        dht = await DHTNode.create(key, cluster, host=addr, port=7000, rpc_timeout=1.0,
                                   bootstrap_backoff=(0.2, 2.0))
        beacon = await Beacon.create(cluster, key=key, dht_host=addr, dht_port=dht.port,
                                     on_peer=lambda h, p, n: dht.add_bootstrap_peer(h, p),
                                     interface=addr, interval=0.3)
        result = {"node": i, "node_id": dht.node_id, "ok": False}
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            await publish_member(dht, {"addr": addr}, ttl=120)
            await dht.put(f"hello/{i}", f"from {i}", ttl=120)
            members = await read_members(dht)
            greetings = {}
            for j in range(%(n)d):
                recs = await dht.get(f"hello/{j}")
                greetings.update({p: r.value for p, r in recs.items()})
            if len(members) == %(n)d and len(greetings) == %(n)d:
                result.update(ok=True, members=sorted(members), greetings=sorted(greetings.values()),
                              beacon=beacon.counters.as_dict(), peers=dht.peers_known())
                break
            await asyncio.sleep(0.3)
        print("RESULT " + json.dumps(result), flush=True)
        # Keep serving the others until the test closes stdin.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await beacon.stop()
        await dht.stop()

    asyncio.run(main())
    """
) % {"n": N}


def test_beacon_discovery_and_dht_across_namespaces() -> None:
    reason = netns_unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    procs: list[subprocess.Popen[str]] = []
    with bridged_hosts(N, "10.77.0", "d") as hosts:
        try:
            _run_nodes(hosts, procs)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    try:
                        if proc.stdin is not None:
                            proc.stdin.close()
                        proc.wait(timeout=5)
                    except (subprocess.TimeoutExpired, OSError):
                        proc.kill()
                        proc.wait(timeout=5)


def _run_nodes(hosts: list[Host], procs: list[subprocess.Popen[str]]) -> None:
    env = {**os.environ, "ENJ_SECRET": generate_secret(), "PYTHONPATH": str(ROOT)}
    for i, host in enumerate(hosts):
        procs.append(
            subprocess.Popen(
                host.command(sys.executable, "-c", NODE_CODE, str(i), host.address),
                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True,
            )
        )
    results = []
    for proc in procs:
        assert proc.stdout is not None
        # Logs go to stdout too; the result is the line marked RESULT.
        for line in proc.stdout:
            if line.startswith("RESULT "):
                results.append(json.loads(line[len("RESULT ") :]))
                break
        else:
            raise AssertionError("a namespace node exited without a result")
    ids = sorted(r["node_id"] for r in results)
    for r in results:
        assert r["ok"], f"node {r['node']} did not discover the others"
        assert r["members"] == ids
        assert r["greetings"] == [f"from {i}" for i in range(N)]
        assert r["beacon"]["peers_seen"] == N - 1
        assert r["peers"] == N - 1
