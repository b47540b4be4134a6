"""Several real daemons on loopback find each other, notice departures, keep ids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from node.testing.localcluster import LocalCluster

pytestmark = pytest.mark.slow


def test_five_daemons_see_each_other_drop_the_dead_and_welcome_it_back(cluster: LocalCluster) -> None:
    nodes = cluster.launch(5)
    cluster.wait_converged(timeout=60)

    # The same view through the CLI, as a user sees it.
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "status", "--json"],
        env={**os.environ, "ENJAMBRE_CONFIG": str(nodes[0].config)}, capture_output=True, text=True, check=True,
    )
    data = json.loads(out.stdout)
    assert data["self"] == nodes[0].node_id
    assert {n["id"] for n in data["nodes"]} == {n.node_id for n in nodes}
    for entry in data["nodes"]:
        for key in ("id", "name", "state", "addresses", "memory_total", "memory_free", "memory_allowed",
                    "tflops", "device", "last_seen_s"):
            assert key in entry, key
        assert entry["state"] == "ready"
        assert entry["memory_allowed"] == 2**30
        assert entry["tflops"] > 0

    victim = nodes[2]
    victim_id = victim.node_id
    cluster.stop(victim, signal.SIGKILL)
    survivors = [n for n in nodes if n is not victim]
    started = time.monotonic()
    cluster.wait_until(lambda: all(victim_id not in cluster.seen_by(n) for n in survivors),
                       timeout=cluster.record_ttl * 3, what="the killed node to expire")
    assert time.monotonic() - started <= cluster.record_ttl * 3

    cluster.start(victim)
    assert victim.node_id == victim_id
    cluster.wait_converged(timeout=60)


def test_clean_stop_is_seen_at_once(cluster: LocalCluster) -> None:
    a, b = cluster.launch(2)
    cluster.wait_converged(timeout=60)
    t0 = time.monotonic()
    assert cluster.stop(b, signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 10
    # A leaving node announces it, so it disappears before its record would expire.
    cluster.wait_until(lambda: cluster.seen_by(a) == {a.node_id}, timeout=cluster.record_ttl,
                       what="the departed node to vanish")


def test_node_with_another_secret_never_joins(cluster: LocalCluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b = cluster.launch(2)
    cluster.wait_converged(timeout=60)
    other_secret = tmp_path / "other.secret"
    subprocess.run([sys.executable, "-m", "node.cli", "init", "--config", str(tmp_path / "x" / "node.toml"),
                    "--data-dir", str(tmp_path / "x" / "data"), "--new-cluster"], check=True, capture_output=True)
    other_secret.write_text((tmp_path / "x" / "cluster.secret").read_text())
    other_secret.chmod(0o600)
    intruder = cluster.add_node(secret_file=other_secret, bootstrap=[f"127.0.0.1:{a.runtime['dht_port']}"])
    cluster.start(intruder)
    time.sleep(cluster.record_ttl)
    # It learns nothing, and nobody learns of it.
    assert cluster.seen_by(intruder) == {intruder.node_id}
    assert cluster.seen_by(a) == {a.node_id, b.node_id}
    assert cluster.seen_by(b) == {a.node_id, b.node_id}
    metrics = urlopen_text(f"http://{a.api}/metrics")
    assert "enjambre_peers_known" in metrics


def urlopen_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def test_rotating_the_secret_keeps_the_cluster_and_locks_out_the_old_one(cluster: LocalCluster) -> None:
    """The procedure the README gives: new secret, install it on every node, restart them."""
    from node.config import update_config

    a, b = cluster.launch(2)
    cluster.wait_converged(timeout=30)
    old_secret = cluster.root / "old.secret"
    old_secret.write_text(cluster.secret_file.read_text())
    old_secret.chmod(0o600)

    def nodectl(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    new = cluster.root / "new.secret"
    new.write_text(nodectl("secret", "--new"))
    new.chmod(0o600)
    for node in (a, b):
        assert "installed the new cluster secret" in nodectl("secret", "--set", str(new), "--config", str(node.config))
        cluster.stop(node)
    cluster.start(a)
    update_config(b.config, {"network": {"bootstrap": [f"127.0.0.1:{a.runtime['dht_port']}"]}})
    cluster.start(b)
    cluster.wait_converged([a, b], timeout=30)
    assert nodectl("secret", "--config", str(a.config)).strip() == new.read_text().strip()
    # A machine that still has the old secret (a lost laptop) no longer gets in.
    stale = cluster.add_node(secret_file=old_secret, bootstrap=[f"127.0.0.1:{a.runtime['dht_port']}"])
    cluster.start(stale)
    time.sleep(cluster.record_ttl / 2)
    assert cluster.seen_by(stale) == {stale.node_id}
    assert cluster.seen_by(a) == {a.node_id, b.node_id}
