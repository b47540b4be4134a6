"""One real daemon: readiness, systemd notifications, the data-dir lock, clean stop, the API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from node.identity import generate_secret, write_secret_file
from node.testing.localcluster import LocalCluster


def _nodectl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_notify_lock_and_clean_stop(cluster: LocalCluster, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    cluster.env["NOTIFY_SOCKET"] = str(sock_path)
    try:
        node = cluster.add_node()
        cluster.start(node)
        assert b"READY=1" in sock.recv(4096)

        # A second daemon on the same config and data dir refuses to start.
        second = _nodectl("serve", "--config", str(node.config))
        assert second.returncode == 1
        assert "already running" in second.stderr and str(node.proc.pid) in second.stderr  # type: ignore[union-attr]

        t0 = time.monotonic()
        assert cluster.stop(node, signal.SIGTERM) == 0
        assert time.monotonic() - t0 < 10
        messages = b""
        while b"STOPPING=1" not in messages:
            messages += sock.recv(4096)
        assert not (node.data_dir / "daemon.json").exists()
        # Everything was released: the same node starts again with the same id.
        old_id = node.node_id
        cluster.start(node)
        assert node.node_id == old_id
    finally:
        sock.close()


def test_api_errors_are_json(cluster: LocalCluster) -> None:
    (node,) = cluster.launch(1)
    for method, path, code in [
        ("GET", "/api/nope", 404),
        ("GET", "/api/cluster/ping/abcd", 405),
        ("POST", "/api/cluster/ping/zz-not-hex", 400),
        ("POST", "/api/cluster/ping/abcdef", 404),
    ]:
        req = urllib.request.Request(f"http://{node.api}{path}", method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code == code, (path, exc.code)
            assert "error" in json.loads(exc.read())
        else:
            raise AssertionError(f"{method} {path} should fail")
    # A web page in a browser on this machine: DNS rebinding, a cross-site read, a simple POST.
    for headers, method, code in [
        ({"Host": f"rebind.attacker.example:{node.runtime['api_port']}"}, "GET", 403),
        ({"Origin": "http://attacker.example"}, "GET", 403),
        ({"Content-Type": "text/plain"}, "POST", 415),
    ]:
        path = "/api/cluster/status" if method == "GET" else "/api/cluster/ping/abcdef"
        req = urllib.request.Request(f"http://{node.api}{path}", method=method, headers=headers,
                                     data=b"x" if method == "POST" else None)
        try:
            urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code == code, (headers, exc.code)
            assert "Access-Control-Allow-Origin" not in exc.headers
        else:
            raise AssertionError(f"{headers} should be refused")
    metrics = urllib.request.urlopen(f"http://{node.api}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    assert families["enjambre_peers_known"].type == "gauge"
    assert families["enjambre_dht_records_held"].type == "gauge"
    assert "enjambre_dht_peers_known" not in families  # a level is not a counter
    for counter in ("enjambre_dht_requests_sent", "enjambre_dht_dropped", "enjambre_dht_rpc_failures",
                    "enjambre_transport_bytes_sent", "enjambre_transport_bytes_received"):
        assert families[counter].type == "counter", counter
    sent = {s.name: s.value for s in families["enjambre_transport_bytes_sent"].samples}
    assert sent["enjambre_transport_bytes_sent_total"] >= 0


def test_ping_over_mutual_tls(cluster: LocalCluster) -> None:
    a, b = cluster.launch(2)
    cluster.wait_converged(timeout=60)
    out = _nodectl("ping", b.node_id[:10], "--json", env={"ENJAMBRE_CONFIG": str(a.config)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["id"] == b.node_id and data["name"] == "node1"
    assert data["rtt_ms"] > 0
    # A peer that vanished but is still in the directory: a clear error, no traceback.
    cluster.stop(b, signal.SIGKILL)
    out = _nodectl("ping", b.node_id[:10], env={"ENJAMBRE_CONFIG": str(a.config)})
    assert out.returncode == 1
    assert "did not answer" in out.stderr and "Traceback" not in out.stderr
    assert cluster.get(a, "/healthz") == {"status": "ok"}  # liveness, nothing more


def test_status_without_daemon_says_how_to_start(tmp_path: Path) -> None:
    out = _nodectl("status", "--host", "127.0.0.1:9")
    assert out.returncode == 1
    assert "nodectl serve" in out.stderr and "Traceback" not in out.stderr


def test_broken_config_is_refused_clearly(tmp_path: Path) -> None:
    secret = tmp_path / "cluster.secret"
    write_secret_file(secret, generate_secret())
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[cluster]\nsecret_file = "{secret}"\n[network]\npeer_port = "seven"\n')
    out = _nodectl("serve", "--config", str(cfg))
    assert out.returncode == 1
    assert "peer_port" in out.stderr and "Traceback" not in out.stderr


def test_busy_port_is_refused_clearly(tmp_path: Path) -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        cfg = tmp_path / "node.toml"
        init = _nodectl("init", "--config", str(cfg), "--data-dir", str(tmp_path / "data"), "--new-cluster",
                        "--peer-port", str(port), "--dht-port", "0", "--api-port", "0", "--no-discovery")
        assert init.returncode == 0, init.stderr
        out = _nodectl("serve", "--config", str(cfg), env={"ENJAMBRE_BENCH_SECONDS": "0.1"})
        assert out.returncode == 1
        assert f"cannot listen for peers on 127.0.0.1:{port}" in out.stderr and "network.peer_port" in out.stderr
        assert "Traceback" not in out.stderr
        assert not (tmp_path / "data" / "daemon.json").exists()
    finally:
        blocker.close()
