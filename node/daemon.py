"""The node daemon: wires identity, transport, DHT, discovery and the HTTP API.

Owns the lifecycle: a lock so one data dir has one daemon, start in order
(transport, DHT, discovery, API), the periodic capability record, systemd
notifications, and a clean stop on SIGTERM/SIGINT that announces the departure.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import structlog
from aiohttp import web

from node import __version__
from node.api.app import PeerNotFound, PeerUnreachable, build_app
from node.cluster.capabilities import Capabilities, collect
from node.config import Config
from node.dht.node import DHTError, DHTNode
from node.identity import ClusterKeys, IdentityError, NodeKey, read_secret_file
from node.net.discovery import Beacon
from node.net.transport import Transport, TransportError
from node.system import sdnotify
from node.system.files import atomic_write
from node.system.metrics import Registry
from protocol.messages import PROTOCOL_VERSION

log = structlog.get_logger("enjambre.daemon")

RUNTIME_FILE = "daemon.json"
# Entries of DHTNode.metrics that are levels, not counts.
_DHT_GAUGES = frozenset({"peers_known", "records_held"})
LOCK_FILE = "daemon.lock"


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class DataDirLock:
    """An exclusive lock on the data dir, so two daemons never share one."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DaemonError(
                f"another enjambre daemon (pid {other}) is already running with data dir "
                f"{self.path.parent}; stop it first (`systemctl stop enjambre` or kill {other}), "
                "or give this one its own config and data dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_runtime(data_dir: Path) -> dict[str, Any] | None:
    """What a running daemon wrote about itself (actual ports when the config said 0)."""
    try:
        data = json.loads((data_dir / RUNTIME_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise DaemonError(f"cannot read the API token file {path}: {exc.strerror}") from None
    if not token:
        raise DaemonError(f"the API token file {path} is empty; put a long random string in it")
    return token


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = "joining"
        self.started_at = time.time()
        self._lock = DataDirLock(config.node.data_dir)
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.key: NodeKey
        self.cluster: ClusterKeys
        self.caps: Capabilities
        self.transport: Transport | None = None
        self.dht: DHTNode | None = None
        self.beacon: Beacon | None = None
        self._runner: web.AppRunner | None = None
        self.api_port = 0
        self.metrics = Registry()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        self._lock.acquire()
        try:
            await self._start(cfg)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, cfg: Config) -> None:
        try:
            self.key = NodeKey.load(cfg.node.key_file)
            self.cluster = ClusterKeys.from_secret(read_secret_file(cfg.cluster.secret_file))
        except IdentityError as exc:
            raise DaemonError(str(exc)) from None
        log.info("starting", node_id=self.key.node_id, name=cfg.node.name, version=__version__,
                 cluster=self.cluster.cluster_id)
        # The TFLOPS probe runs JAX for a second or two: keep it off the loop.
        self.caps = await asyncio.to_thread(collect, cfg, data_dir=cfg.node.data_dir)

        net = cfg.network
        self.transport = Transport(
            self.key, self.cluster, name=cfg.node.name, software_version=__version__,
            allow_public=net.allow_public,
        )
        self.transport.on_request("node.info", self._on_node_info)
        await self._bind(self.transport.start(net.listen, net.peer_port), "peer", net.peer_port)

        self.dht = await self._bind(
            DHTNode.create(self.key, self.cluster, host=net.listen, port=net.dht_port,
                           ksize=cfg.dht.ksize, alpha=cfg.dht.alpha, allow_public=net.allow_public),
            "DHT", net.dht_port,
        )
        if net.discovery:
            self.beacon = await Beacon.create(
                self.cluster, node_id=self.key.node_id, dht_host=net.listen, dht_port=self.dht.port,
                on_peer=self._on_beacon_peer, group=net.beacon_group, port=net.beacon_port,
                interface=net.listen, interval=net.beacon_interval, allow_public=net.allow_public,
            )

        await self._start_api()
        self._register_metrics()
        self._write_runtime()

        if net.bootstrap:
            await self.dht.bootstrap(list(net.bootstrap))
        self.state = "ready"
        await self._publish()
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="refresh"))
        sdnotify.notify(f"READY=1\nSTATUS=serving as {cfg.node.name}")
        log.info("ready", peer_port=self.transport.port, dht_port=self.dht.port, api_port=self.api_port)

    async def _bind(self, coro: Any, what: str, port: int) -> Any:
        try:
            return await coro
        except (TransportError, DHTError) as exc:  # these already say what to do
            raise DaemonError(str(exc)) from None
        except OSError as exc:
            raise DaemonError(
                f"cannot listen on {self.config.network.listen}:{port} for the {what} port ({exc.strerror}); "
                f"is another program using it? change network.{what.lower()}_port in the config"
            ) from None

    async def _start_api(self) -> None:
        cfg = self.config.api
        app = build_app(self, token=_read_token(cfg.token_file))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise DaemonError(f"cannot listen on {cfg.host}:{cfg.port} for the API ({exc.strerror})") from None
        self.api_port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Announce the departure, then close everything. Safe to call twice."""
        if self.state == "stopped":
            return
        was_serving = self.state in ("ready", "busy")
        self.state = "leaving"
        sdnotify.notify("STOPPING=1")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if was_serving and self.dht is not None:
            # Withdraw our records so peers drop this node now, not at expiry.
            with contextlib.suppress(Exception):
                await self.dht.leave(within=2.0)
        if self.beacon is not None:
            await self.beacon.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.dht is not None:
            await self.dht.stop()
        if self.transport is not None:
            await self.transport.close()
        (self.config.node.data_dir / RUNTIME_FILE).unlink(missing_ok=True)
        self._lock.release()
        self.state = "stopped"
        self._stopped.set()
        log.info("stopped")

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        await self.start()
        await stop_requested.wait()
        log.info("signal received, stopping")
        await self.stop()

    def _write_runtime(self) -> None:
        assert self.transport is not None and self.dht is not None
        data = {
            "pid": os.getpid(), "node_id": self.key.node_id, "api_host": self.config.api.host,
            "api_port": self.api_port, "peer_port": self.transport.port, "dht_port": self.dht.port,
        }
        atomic_write(self.config.node.data_dir / RUNTIME_FILE, json.dumps(data))

    # ------------------------------------------------------------------ membership

    def record(self) -> dict[str, Any]:
        """This node's capability record as published in the DHT directory."""
        assert self.transport is not None and self.dht is not None
        caps = self.caps.to_dict()
        return {
            **caps,
            "id": self.key.node_id,
            "name": self.config.node.name,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "addresses": [self.config.network.listen],
            "peer_port": self.transport.port,
            "dht_port": self.dht.port,
            "state": self.state,
            "memory_free": (self.caps.device_memory_available
                            if self.caps.device_kind != "cpu" and self.caps.device_memory_available is not None
                            else self.caps.memory_available),
            "memory_used": psutil.Process().memory_info().rss,
            "uptime_s": round(time.time() - self.started_at, 1),
            "ts": time.time(),
        }

    async def _publish(self, ttl: float | None = None) -> None:
        assert self.dht is not None
        await self.dht.publish_member(self.record(), ttl=ttl or self.config.dht.record_ttl)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.dht.refresh_interval)
            try:
                self.caps = self.caps.refresh_memory()
                await self._publish()
            except Exception as exc:  # a failed refresh must not kill the daemon
                log.warning("refresh failed", error=str(exc))

    def _on_beacon_peer(self, host: str, dht_port: int, node_id: str) -> None:
        if self.dht is not None and node_id != self.key.node_id:
            self.dht.add_bootstrap_peer(host, dht_port)

    async def _on_node_info(self, _conn: Any, _body: Any) -> dict[str, Any]:
        return self.record()

    # ------------------------------------------------------------------ API view

    async def _members(self) -> dict[str, dict[str, Any]]:
        assert self.dht is not None
        found = {pid: rec.value for pid, rec in (await self.dht.members()).items() if isinstance(rec.value, dict)}
        found[self.key.node_id] = self.record()
        return found

    async def cluster_status(self) -> dict[str, Any]:
        now = time.time()
        nodes = []
        for node_id, value in (await self._members()).items():
            if value.get("state") == "leaving" and node_id != self.key.node_id:
                continue
            entry = {k: v for k, v in value.items() if k != "ts"}
            entry["id"] = node_id
            entry["last_seen_s"] = round(max(0.0, now - float(value.get("ts", now))), 1)
            entry["self"] = node_id == self.key.node_id
            nodes.append(entry)
        nodes.sort(key=lambda n: (not n["self"], n.get("name", ""), n["id"]))
        return {"self": self.key.node_id, "cluster": self.cluster.cluster_id, "nodes": nodes}

    async def ping_peer(self, node_id: str) -> dict[str, Any]:
        assert self.transport is not None
        members = await self._members()
        matches = [nid for nid in members if nid.startswith(node_id)]
        if len(matches) != 1:
            raise PeerNotFound(
                f"no node with id {node_id}" if not matches else f"id prefix {node_id} is ambiguous"
            )
        value = members[matches[0]]
        host = value["addresses"][0]
        start = time.perf_counter()
        try:
            conn = await asyncio.wait_for(
                self.transport.connect(host, int(value["peer_port"]), expect_node_id=matches[0]), 5.0
            )
            connected = time.perf_counter()
            info = await conn.request("node.info", None, timeout=5.0)
        except (TransportError, OSError, TimeoutError) as exc:
            raise PeerUnreachable(
                f"node {matches[0][:12]} at {host}:{value['peer_port']} did not answer ({exc or type(exc).__name__})"
            ) from None
        done = time.perf_counter()
        return {
            "id": matches[0], "name": info.get("name"), "address": f"{host}:{value['peer_port']}",
            "connect_ms": round((connected - start) * 1000, 3), "rtt_ms": round((done - connected) * 1000, 3),
        }

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "state": self.state, "node_id": self.key.node_id, "version": __version__}

    def _register_metrics(self) -> None:
        m = self.metrics
        dht, transport, beacon = self.dht, self.transport, self.beacon
        assert dht is not None and transport is not None
        m.gauge_callback("enjambre_peers_known", "Peers in the DHT routing table", dht.peers_known)
        m.gauge_callback("enjambre_dht_records_held", "Records this node stores for the DHT",
                         lambda: dht.metrics.get("records_held", 0))
        m.counters_from_dict("enjambre_dht", "DHT counters", lambda: {
            k: v for k, v in dht.metrics.items() if k not in _DHT_GAUGES
        })
        m.counters_from_dict("enjambre_transport", "Transport counters", transport.stats_dict)
        if beacon is not None:
            m.counters_from_dict("enjambre_beacon", "LAN beacon counters", lambda: beacon.metrics)

    def metrics_text(self) -> str:
        return self.metrics.render()
