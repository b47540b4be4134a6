"""Several real daemons on this machine, on loopback: the demo and the integration tests.

Each node gets its own config, key and data dir under one root, every port is
picked by the OS (port 0) and read back from the daemon's runtime file, and
every node after the first bootstraps from the first node's DHT address. A node
given a ``Host`` (node/testing/netns.py) runs inside that network namespace and listens
on its address; its API stays on the namespace's own loopback, reached through a
socket made inside it (``connection``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import update_config
from node.system.datadir import read_runtime
from node.testing.netns import Host


class ClusterTimeout(TimeoutError):
    pass


@dataclass
class LocalNode:
    index: int
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None
    node_id: str = ""
    runtime: dict[str, Any] = field(default_factory=dict)
    host: Host | None = None  # a network namespace to run in; None: this machine's loopback

    @property
    def address(self) -> str:
        """The address it listens on and peers reach it at."""
        return self.host.address if self.host is not None else "127.0.0.1"

    @property
    def config(self) -> Path:
        return self.root / "node.toml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def api(self) -> str:
        return f"127.0.0.1:{self.runtime['api_port']}"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"


class LocalCluster:
    """Start, stop and query N daemons on 127.0.0.1 (always `close()` it)."""

    def __init__(self, root: Path, *, python: str = sys.executable, env: dict[str, str] | None = None,
                 refresh_interval: float = 1.0, record_ttl: float = 6.0, name_prefix: str = "node",
                 compile_cache: Path | None = None) -> None:
        """``compile_cache``: XLA's persistent cache shared by the nodes (they run on one
        machine, as daemons of one machine may share it); default: one under ``root``."""
        self.root = Path(root)
        self.python = python
        self.env = {**os.environ, **(env or {})}
        self.refresh_interval = refresh_interval
        self.record_ttl = record_ttl
        self.name_prefix = name_prefix
        self.nodes: list[LocalNode] = []
        self.secret_file = self.root / "cluster.secret.txt"
        self.compile_cache = Path(compile_cache) if compile_cache is not None else self.root / "xla-cache"

    # ------------------------------------------------------------------ setup

    def _nodectl(self, *args: str) -> str:
        out = subprocess.run([self.python, "-m", "node.cli", *args], env=self.env, capture_output=True,
                             text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"nodectl {args[0]} failed: {out.stderr.strip()}")
        return out.stdout

    def add_node(
        self, *, secret_file: Path | None = None, bootstrap: list[str] | None = None,
        config: dict[str, dict[str, Any]] | None = None, host: Host | None = None,
    ) -> LocalNode:
        """Write a node's config (``config`` sets more keys, e.g. {"network": {"discovery": True}});
        ``host``: run it in that network namespace, listening on its address."""
        node = LocalNode(index=len(self.nodes), root=self.root / f"{self.name_prefix}{len(self.nodes)}", host=host)
        node.root.mkdir(parents=True, exist_ok=True)
        if bootstrap is None and self.nodes:
            first = self.nodes[0]
            bootstrap = [f"{first.address}:{first.runtime['dht_port']}"]
        args = ["init", "--config", str(node.config), "--data-dir", str(node.data_dir),
                "--name", f"{self.name_prefix}{node.index}", "--listen", node.address,
                "--peer-port", "0", "--dht-port", "0", "--api-port", "0", "--no-discovery",
                "--max-memory", "1GiB"]
        for b in bootstrap or []:
            args += ["--bootstrap", b]
        own_secret = secret_file or (self.secret_file if self.secret_file.exists() else None)
        if own_secret is None:
            args.append("--new-cluster")
        else:
            args += ["--secret-file", str(own_secret)]
        self._nodectl(*args)
        if own_secret is None:
            secret = self._nodectl("secret", "--config", str(node.config)).strip()
            self.secret_file.write_text(secret + "\n")
            self.secret_file.chmod(0o600)
        # init wrote a [dht] section (all commented out), so set the keys in it, not after it.
        values: dict[str, dict[str, Any]] = {
            "dht": {"republish_interval": self.refresh_interval, "record_ttl": self.record_ttl},
            "engine": {"compile_cache": str(self.compile_cache)},
        }
        for section, table in (config or {}).items():
            values.setdefault(section, {}).update(table)
        update_config(node.config, values)
        self.nodes.append(node)
        return node

    def start(self, node: LocalNode, *, timeout: float = 60.0) -> None:
        (node.data_dir / "daemon.json").unlink(missing_ok=True)
        node.log = node.log_path.open("ab")
        argv = [self.python, "-m", "node.cli", "serve", "--config", str(node.config)]
        node.proc = subprocess.Popen(  # `ip netns exec` execs the daemon: the pid is the daemon's
            node.host.command(*argv) if node.host is not None else argv,
            stdout=node.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {node.index} exited ({node.proc.returncode}):\n{self.tail(node)}")
            runtime = read_runtime(node.data_dir)
            if runtime and runtime.get("pid") == node.proc.pid:
                node.runtime = runtime
                node.node_id = str(runtime["node_id"])
                with contextlib.suppress(OSError, ValueError):
                    if self.get(node, "/healthz").get("status") == "ok":
                        return
            time.sleep(0.1)
        raise ClusterTimeout(f"node {node.index} did not become ready in {timeout:.0f}s:\n{self.tail(node)}")

    def launch(self, n: int, *, timeout: float = 90.0) -> list[LocalNode]:
        """Create and start n nodes (the first one bootstraps the others)."""
        first = self.add_node()
        self.start(first, timeout=timeout)
        rest = [self.add_node() for _ in range(n - 1)]
        for node in rest:
            self.start(node, timeout=timeout)
        return self.nodes

    # ------------------------------------------------------------------ control

    def stop(self, node: LocalNode, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if node.proc is None:
            return None
        if node.proc.poll() is None:
            node.proc.send_signal(sig)
        try:
            code = node.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            code = node.proc.wait(5)
        if node.log is not None:
            node.log.close()
        node.proc = None
        return code

    def close(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            self.stop(node, timeout=10)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ queries

    def connection(self, node: LocalNode, timeout: float = 10.0) -> http.client.HTTPConnection:
        """An unopened HTTP connection to the node's API (inside its namespace, if it has one)."""
        port = int(node.runtime["api_port"])
        if node.host is not None:
            return node.host.connection("127.0.0.1", port, timeout)
        return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def get(self, node: LocalNode, path: str, *, method: str = "GET", timeout: float = 10.0) -> Any:
        body = b"{}" if method == "POST" else None
        if node.host is not None:
            conn = self.connection(node, timeout)
            try:
                conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status >= 400:
                    raise OSError(f"HTTP {resp.status} from {node.root.name} {path}: {data[:300]!r}")
                return json.loads(data)
            finally:
                conn.close()
        req = urllib.request.Request(f"http://{node.api}{path}", data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def status(self, node: LocalNode) -> dict[str, Any]:
        return dict(self.get(node, "/api/cluster/status"))

    def seen_by(self, node: LocalNode) -> set[str]:
        return {n["id"] for n in self.status(node)["nodes"]}

    def wait_until(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (OSError, ValueError, KeyError) as exc:
                last = exc
            time.sleep(0.25)
        raise ClusterTimeout(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")

    def wait_converged(self, nodes: list[LocalNode] | None = None, timeout: float = 60.0) -> None:
        """Until every running node sees exactly the running nodes."""
        live = [n for n in (nodes or self.nodes) if n.proc is not None]
        want = {n.node_id for n in live}
        self.wait_until(lambda: all(self.seen_by(n) == want for n in live), timeout,
                        f"{len(live)} nodes to see each other")

    @staticmethod
    def tail(node: LocalNode, lines: int = 30) -> str:
        try:
            return "\n".join(node.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
