"""The node daemon: wires identity, transport, DHT, discovery and the HTTP API, and runs their lifecycle.

Start in order (lock, keys, capabilities, transport, DHT, beacon, API, runtime
file, bootstrap, first record), refresh the directory record periodically, tell
systemd, and stop cleanly on SIGTERM/SIGINT after announcing the departure. What
each part does lives in its own package; this module only connects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import structlog
from aiohttp import web

from node import __version__
from node.api.app import build_app
from node.cluster.capabilities import Capabilities, collect
from node.cluster.directory import (
    RecentMembers,
    member_problem,
    member_record,
    publish_member,
    read_members,
    status_view,
)
from node.cluster.peers import Peers
from node.cluster.ping import ping_member
from node.cluster.rtt import RttTable
from node.cluster.speed import ProbeError, ProbeServer
from node.config import Config
from node.dht.errors import DHTError
from node.dht.node import DHTNode
from node.engine import backend
from node.identity import ClusterKeys, IdentityError, NodeKey, read_secret_file
from node.net.discovery import Beacon
from node.net.errors import RequestRefused, TransportError
from node.net.transport import Transport
from node.pipeline.models import LEASE_TTL, LoadedModels
from node.pipeline.session import Sessions
from node.pipeline.worker import StageWorker
from node.store.models import ModelStore
from node.swarm.service import ModelService
from node.system import sdnotify
from node.system.clock import ClockOffsets
from node.system.counters import Counters
from node.system.datadir import DataDirLock, LockedError, remove_runtime, write_runtime
from node.system.looplag import LoopLag, watch_loop_lag
from node.system.metrics import CountersCollector, GaugesCollector, new_registry, render
from protocol.messages import PROTOCOL_VERSION

log = structlog.get_logger("enjambre.daemon")

SEQ_FILE = "dht.seq"
COMPILE_CACHE_DIR = "xla-cache"  # JAX's persistent compilation cache, in the data dir
# An offset from the peers' clocks this large gets a warning in this node's log.
CLOCK_WARNING_S = 10.0


def _warm_up() -> None:
    from node.engine.warmup import warm_up  # JAX: off the loop, after start-up

    warm_up()


def _raise_open_files_limit() -> None:
    # Every peer, handshake and API client is a descriptor; 1024 (a common default)
    # filled up under a connection flood and made accept() fail for members too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


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


def _prepare_engine(cfg: Config) -> None:
    """Size JAX's accelerator pool to what the node lends and give it a persistent
    compilation cache in the data dir; before anything starts JAX (the device probe).

    In a process that already started JAX (tests running several daemons) the pool is
    fixed: that is logged, not an error.
    """
    if backend.backend_started():
        log.debug("jax_already_started", note="memory settings of the first start apply")
    else:
        try:
            setup = backend.configure_memory(cfg.resources.max_memory)
        except ValueError as exc:  # max_memory below the GPU runtime's own reserve
            raise DaemonError(str(exc)) from None
        if setup.gpu_total is not None:
            log.info("gpu_memory", fraction=setup.fraction, gpu_total=setup.gpu_total)
    backend.enable_compilation_cache(cfg.engine.compile_cache or cfg.node.data_dir / COMPILE_CACHE_DIR)


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
        self.metrics = new_registry()
        self.clock_offsets = ClockOffsets()
        self.counters = Counters(by_reason=("members_invalid",))
        self._recent = RecentMembers(grace=config.dht.record_ttl)  # members a lossy read missed
        self.swarm_counters = Counters(("pieces_served", "pieces_fetched", "bytes_served", "bytes_fetched"),
                                       by_reason=("refused",))
        self.models: ModelService | None = None
        self.peers: Peers | None = None
        self.worker: StageWorker | None = None
        self.loaded: LoadedModels | None = None  # the models this node drives
        self.sessions: Sessions | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        self.rtts = RttTable()
        self._probes = ProbeServer()  # answers drivers' speed probes
        self.loop_lag = LoopLag()  # record() answers node.info before the watcher starts
        self._clock_warned_at = -math.inf

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        try:
            self._lock.acquire()
        except LockedError as exc:
            raise DaemonError(str(exc)) from None
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
        _raise_open_files_limit()
        _prepare_engine(cfg)
        # The TFLOPS probe runs JAX for a second or two: keep it off the loop.
        self.caps = await asyncio.to_thread(collect, cfg, data_dir=cfg.node.data_dir)

        net = cfg.network
        self.transport = Transport(
            self.key, self.cluster, name=cfg.node.name, software_version=__version__,
            allow_public=net.allow_public,
        )
        self.transport.on_request("node.info", self._on_node_info)
        self.transport.on_request("cluster.probe", self._on_probe)
        await self._bind(self.transport.start(net.listen, net.peer_port), "peer", net.peer_port)

        self.dht = await self._bind(
            DHTNode.create(self.key, self.cluster, host=net.listen, port=net.dht_port,
                           ksize=cfg.dht.ksize, alpha=cfg.dht.alpha, allow_public=net.allow_public,
                           clock_offsets=self.clock_offsets, seq_file=cfg.node.data_dir / SEQ_FILE),
            "DHT", net.dht_port,
        )
        if net.discovery:
            self.beacon = await Beacon.create(
                self.cluster, key=self.key, dht_host=net.listen, dht_port=self.dht.port,
                on_peer=self._on_beacon_peer, group=net.beacon_group, port=net.beacon_port,
                interface=net.listen, interval=net.beacon_interval, allow_public=net.allow_public,
                clock_offsets=self.clock_offsets,
            )

        self.models = ModelService(
            ModelStore(cfg.node.data_dir), self.dht, self.transport, self._members, self.swarm_counters,
            piece_size=cfg.swarm.piece_size, ttl=cfg.dht.record_ttl, max_upload_rate=cfg.swarm.max_upload_rate,
            max_download_rate=cfg.swarm.max_download_rate, share=cfg.swarm.share,
            # Catalogue downloads: $ENJAMBRE_CACHE when set (shared by the daemons of one
            # machine, as the tests and the demo run them), else the node's own data dir.
            download_dir=Path(os.environ["ENJAMBRE_CACHE"]) if os.environ.get("ENJAMBRE_CACHE")
            else Path(cfg.node.data_dir) / "downloads",
        )
        self.peers = self.models.peers
        self.worker = StageWorker(self.key.node_id, self.models, self.peers,
                                  memory_allowed=self.caps.memory_allowed, step_timeout=cfg.engine.step_timeout,
                                  on_change=self._publish_soon)
        self.worker.register(self.transport)
        self.loaded = LoadedModels(self.key.node_id, self.models, self.peers, members=self._members,
                                   engine=cfg.engine, data_dir=cfg.node.data_dir,
                                   record_ttl=cfg.dht.record_ttl, allow=cfg.cluster.allow, deny=cfg.cluster.deny)
        self.sessions = Sessions(self.loaded, self.peers, step_timeout=cfg.engine.step_timeout,
                                 queue=cfg.engine.queue)
        await self._start_api()
        self._register_metrics()
        self._write_runtime()

        if net.bootstrap:
            await self.dht.bootstrap(list(net.bootstrap))
        self.state = "ready"
        await self._publish()
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="refresh"))
        self._tasks.append(asyncio.create_task(watch_loop_lag(self.metrics, lag=self.loop_lag), name="loop-lag"))
        self._tasks.append(asyncio.create_task(self._leases_loop(), name="leases"))
        self._tasks.append(asyncio.create_task(self._warm_engine(), name="warm-engine"))
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
        app = build_app(self, models=self.models, loaded=self.loaded, sessions=self.sessions, token=_read_token(cfg.token_file), api_host=cfg.host,
                        allowed_origins=cfg.allowed_origins)
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
        if self.loaded is not None:
            await self.loaded.shutdown()
        if self.worker is not None:
            await self.worker.shutdown()
        if self.dht is not None:
            await self.dht.stop()
        if self.transport is not None:
            await self.transport.close()
        remove_runtime(self.config.node.data_dir)
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
        write_runtime(self.config.node.data_dir, {
            "pid": os.getpid(), "node_id": self.key.node_id, "api_host": self.config.api.host,
            "api_port": self.api_port, "peer_port": self.transport.port, "dht_port": self.dht.port,
        })

    # ------------------------------------------------------------------ membership

    def record(self) -> dict[str, Any]:
        """This node's capability record as published in the DHT directory."""
        assert self.transport is not None and self.dht is not None
        caps = self.caps
        return member_record(
            caps.to_dict(), node_id=self.key.node_id, name=self.config.node.name, version=__version__,
            protocol=PROTOCOL_VERSION, address=self.config.network.listen,
            peer_port=self.transport.port or 0, dht_port=self.dht.port, state=self.state,
            memory_free=caps.memory_free, rss=psutil.Process().memory_info().rss,
            started_at=self.started_at, clock_offset_s=self._clock_offset(),
            serving=self.worker.serving() if self.worker is not None else [],
            rtt_ms=self.rtts.lowest(), loop_lag_ms=self.loop_lag.p50_ms(time.monotonic()),
        )

    def _clock_offset(self) -> float | None:
        """How far this node's clock is from its peers' (their median minus ours), and a
        warning in this node's own log when it is far enough to matter: beyond ±60 s
        every DHT datagram is dropped both ways, and only this node can tell why."""
        now = time.time()
        offset = self.clock_offsets.offset(now)
        if offset is None:
            return None
        if abs(offset) >= CLOCK_WARNING_S and time.monotonic() - self._clock_warned_at >= 600:
            self._clock_warned_at = time.monotonic()
            log.warning("this node's clock differs from its peers'", offset_s=round(-offset, 1),
                        peers=self.clock_offsets.peers(now),
                        fix="synchronise the clock (NTP); beyond 60 s the DHT drops this node's traffic")
        return -offset

    async def _publish(self, ttl: float | None = None) -> None:
        assert self.dht is not None
        await publish_member(self.dht, self.record(), ttl=ttl or self.config.dht.record_ttl)

    def _publish_soon(self) -> None:
        """Publish this node's record now (what it serves changed), not at the next refresh."""
        if self.state != "ready":
            return
        task = asyncio.ensure_future(self._publish())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _warm_engine(self) -> None:
        """Import the engine and start JAX in the background after start-up: seconds a node
        would otherwise spend when it first loads layers, which may be while it takes over
        from a node that died mid-answer."""
        try:
            await asyncio.to_thread(_warm_up)
        except Exception as exc:  # the first load will say what is wrong, with its cause
            log.info("engine_warmup_failed", error=f"{type(exc).__name__}: {exc}")

    async def _leases_loop(self) -> None:
        """Renew this driver's leases on its models' stages, let go of idle ones."""
        while True:
            await asyncio.sleep(min(LEASE_TTL / 4, self.config.engine.keep_alive / 2))
            if self.loaded is not None:
                try:
                    await self.loaded.maintain()
                except Exception as exc:  # best effort: stages let go on their own when leases lapse
                    log.warning("lease_renewal_failed", error=f"{type(exc).__name__}: {exc}")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.dht.republish_interval)
            try:
                self.caps = self.caps.refresh_memory()
                if self.transport is not None:
                    await self.rtts.measure(self.transport, await self._members(), self.key.node_id)
                await self._publish()
                if self.models is not None:
                    await self.models.publish()
            except Exception as exc:  # a failed refresh must not kill the daemon
                log.warning("refresh failed", error=str(exc))

    def _on_beacon_peer(self, host: str, dht_port: int, node_id: str) -> None:
        if self.dht is not None and node_id != self.key.node_id:
            self.dht.add_bootstrap_peer(host, dht_port)

    async def _on_node_info(self, _conn: Any, _body: Any) -> dict[str, Any]:
        return self.record()

    async def _on_probe(self, conn: Any, body: Any) -> dict[str, Any]:
        """A driver times this node's compute (node/cluster/speed.py)."""
        try:
            return await self._probes.handle(str(conn.node_id), body)
        except ProbeError as exc:
            raise RequestRefused("bad_probe", str(exc)) from None

    # ------------------------------------------------------------------ API view

    async def _members(self) -> dict[str, dict[str, Any]]:
        assert self.dht is not None
        found = {}
        for pid, rec in (await read_members(self.dht)).items():
            problem = member_problem(pid, rec.value)
            if problem is None:
                found[pid] = rec.value
            else:  # one member's bad record must not break the view for everyone
                self.counters.inc("members_invalid", reason=problem)
        found = self._recent.merge(found)
        found[self.key.node_id] = self.record()
        return found

    async def cluster_status(self) -> dict[str, Any]:
        return status_view(
            await self._members(), self_id=self.key.node_id, cluster_id=self.cluster.cluster_id, now=time.time(),
            speeds=self.loaded.speeds if self.loaded is not None else None,
        )

    async def ping_peer(self, node_id: str) -> dict[str, Any]:
        assert self.transport is not None
        return await ping_member(self.transport, await self._members(), node_id)

    def health(self) -> dict[str, Any]:
        # Liveness only: no id, version or name for whoever can reach the port.
        return {"status": "ok" if self.state in ("ready", "busy") else self.state}

    def _register_metrics(self) -> None:
        dht, transport, beacon = self.dht, self.transport, self.beacon
        assert dht is not None and transport is not None
        self.metrics.register(GaugesCollector({
            "enjambre_peers_known": ("Peers in the DHT routing table", dht.peers_known),
            "enjambre_dht_records_held": ("Records this node stores for the DHT", dht.records_held),
            "enjambre_pipeline_sessions": ("Sessions whose KV caches this node's stages hold",
                                           self.worker.sessions if self.worker is not None else lambda: 0),
            "enjambre_pipeline_driven_sessions": ("Sessions this node drives", self._driven_sessions),
        }))
        self.metrics.register(CountersCollector("dht", dht.counters))
        self.metrics.register(CountersCollector("cluster", self.counters))
        self.metrics.register(CountersCollector("swarm", self.swarm_counters))
        self.metrics.register(CountersCollector("transport", transport.counters))
        if beacon is not None:
            self.metrics.register(CountersCollector("beacon", beacon.counters))

    def _driven_sessions(self) -> int:
        return sum(len(m.sessions) for m in self.loaded.table.values()) if self.loaded is not None else 0

    def metrics_text(self) -> bytes:
        return render(self.metrics)
