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
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from node.identity import generate_secret

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
N = 3

NODE_CODE = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from node.dht import DHTNode
    from node.discovery import Beacon
    from node.identity import ClusterKeys, NodeKey, parse_secret

    async def main():
        i, addr = int(sys.argv[1]), sys.argv[2]
        cluster = ClusterKeys.from_secret(parse_secret(os.environ["ENJ_SECRET"]))
        dht = await DHTNode.create(NodeKey.generate(), cluster, host=addr, port=7000, rpc_timeout=1.0,
                                   bootstrap_backoff=(0.2, 2.0))
        beacon = await Beacon.create(cluster, node_id=dht.node_id, dht_host=addr, dht_port=dht.port,
                                     on_peer=lambda h, p, n: dht.add_bootstrap_peer(h, p),
                                     interface=addr, interval=0.3)
        result = {"node": i, "node_id": dht.node_id, "ok": False}
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            await dht.publish_member({"addr": addr}, ttl=120)
            await dht.put(f"hello/{i}", f"from {i}", ttl=120)
            members = await dht.members()
            greetings = {}
            for j in range(%(n)d):
                recs = await dht.get(f"hello/{j}")
                greetings.update({p: r.value for p, r in recs.items()})
            if len(members) == %(n)d and len(greetings) == %(n)d:
                result.update(ok=True, members=sorted(members), greetings=sorted(greetings.values()),
                              beacon=beacon.metrics, peers=dht.peers_known())
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


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def _netns_usable() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    probe = f"enjprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"`ip netns` does not work here ({exc})"
    return None


def test_beacon_discovery_and_dht_across_namespaces() -> None:
    reason = _netns_usable()
    if reason is not None:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    hub = f"enjhub{tag}"
    spaces = [f"enjn{i}x{tag}" for i in range(N)]
    procs: list[subprocess.Popen[str]] = []
    created: list[str] = []
    try:
        _run("ip", "netns", "add", hub)
        created.append(hub)
        _run("ip", "-n", hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _run("ip", "-n", hub, "link", "set", "br0", "up")
        for i, ns in enumerate(spaces):
            _run("ip", "netns", "add", ns)
            created.append(ns)
            _run("ip", "-n", hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", f"v{i}")
            _run("ip", "-n", hub, "link", "set", f"p{i}", "master", "br0")
            _run("ip", "-n", hub, "link", "set", f"p{i}", "up")
            _run("ip", "-n", hub, "link", "set", f"v{i}", "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"10.77.0.{i + 1}/24", "dev", f"v{i}")
            _run("ip", "-n", ns, "link", "set", f"v{i}", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        env = {**os.environ, "ENJ_SECRET": generate_secret(), "PYTHONPATH": str(ROOT)}
        for i, ns in enumerate(spaces):
            procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        sys.executable,
                        "-c",
                        NODE_CODE,
                        str(i),
                        f"10.77.0.{i + 1}",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
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
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
