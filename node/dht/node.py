"""The cluster DHT node: kademlia's Server with sealed datagrams and signed multi-publisher records.

What changes from the ``kademlia``/``rpcudp`` packages, and where:

* Datagrams and identity: sealed, signed msgpack datagrams whose sender id
  must match their key (format in protocol/dht.py, I/O in node/dht/protocol.py).
* Values. Storage holds one signed record (protocol/records.py) per (key,
  publisher). Records are checked on store and on every read; an older seq
  never replaces a newer one; expiry is relative to receipt, and a forwarded
  record carries the sender's remaining lifetime so nobody extends it
  (node/dht/storage.py).
* Lookups. ``find_value`` answers with both records and neighbours, and a
  lookup crawls to the k closest nodes merging every record it sees, instead
  of stopping at the first value (node/dht/routing.py).
* Refresh. Every ``refresh_interval`` (kademlia's bucket refresh, an hour by
  default) lonely buckets are refreshed and only this node's own records are
  republished with their original expiry; records of dead nodes simply run out.
  (The node's directory record is republished more often by the daemon:
  ``dht.republish_interval`` in the config.)
* Departure. ``delete``/``leave`` publish tombstones (newer seq, no value) that
  hide this node's records until the old copies would have expired anyway.
* Bootstrap. Configured peers that do not answer are retried forever with
  exponential backoff; peers from the LAN beacon join the same retry list
  (node/dht/bootstrap.py).

This module owns the node's public API (create, put/get/lookup, delete/leave,
bootstrap, stop, counters); its parts get narrow inputs and never import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import structlog
from kademlia.crawling import NodeSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.utils import digest

from node.dht.bootstrap import Bootstrapper
from node.dht.errors import DHTError
from node.dht.protocol import DatagramSettings, SealedProtocol
from node.dht.routing import LookupResult, RecordCrawl, RecordSet
from node.dht.storage import RecordStore
from node.identity import ClusterKeys, NodeKey
from node.system.clock import ClockOffsets
from node.system.counters import Counters
from node.system.files import atomic_write
from protocol.ids import DHT_ID_BYTES
from protocol.records import MAX_TTL, Record, expiry_for, make_record
from protocol.seal import DEFAULT_MAX_SKEW

__all__ = ["COUNTERS", "DHTNode"]

log = structlog.get_logger("enjambre.dht")

# Counted from the start (so /metrics shows them at 0); "dropped" and
# "records_rejected" are kept by reason.
COUNTERS = (
    "requests_sent", "requests_received", "responses_received", "rpc_failures",
    "datagrams_sent", "datagrams_received", "bytes_sent", "bytes_received", "lookups",
    "rpc_skipped_unreachable",
)
UNREACHABLE_S = 60.0  # how long lookups skip a node whose port refused a connection


class DHTNode(Server):
    """One node of the cluster DHT. Build with :meth:`create`; stop with :meth:`stop`."""

    protocol_class = SealedProtocol

    def __init__(
        self,
        key: NodeKey,
        cluster: ClusterKeys,
        *,
        ksize: int = 20,
        alpha: int = 3,
        allow_public: bool = False,
        rpc_timeout: float = 2.0,
        max_skew: float = DEFAULT_MAX_SKEW,
        refresh_interval: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        bootstrap_backoff: tuple[float, float] = (1.0, 60.0),
        clock_offsets: ClockOffsets | None = None,
        seq_file: Path | None = None,
    ) -> None:
        """``seq_file`` keeps the last record sequence number across restarts (and across
        a wall clock that jumped forward and was set back): without it the sequence
        numbers are wall-clock milliseconds, and records published after the clock
        was corrected would lose to the ones published while it ran ahead."""
        self.key = key
        self.clock_offsets = clock_offsets
        self._seq_file = seq_file
        self.allow_public = allow_public
        self.refresh_interval = refresh_interval
        self.clock = clock
        self.wall_clock = wall_clock
        self.bootstrap_backoff = bootstrap_backoff
        self.settings = DatagramSettings(
            seal_key=cluster.dht_key, public_key=key.public_bytes, sign=key.sign,
            allow_public=allow_public, rpc_timeout=rpc_timeout, max_skew=max_skew,
        )
        self.counters = Counters(COUNTERS, by_reason=("dropped", "records_rejected"))
        super().__init__(ksize=ksize, alpha=alpha, node_id=key.dht_id)
        # Set after: kademlia's ``storage or ForgetfulStorage()`` would treat an
        # empty RecordStore as missing.
        self.storage: RecordStore = RecordStore(clock=clock)
        self.node_id = key.node_id
        self.host = ""
        self.port = 0
        self._own: dict[str, Record] = {}
        self._last_seq = _read_seq(seq_file)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bootstrapper: Bootstrapper | None = None
        self._stopped = False

    # ------------------------------------------------------------- lifecycle

    @classmethod
    async def create(
        cls,
        key: NodeKey,
        cluster: ClusterKeys,
        *,
        host: str,
        port: int,
        ksize: int = 20,
        alpha: int = 3,
        allow_public: bool = False,
        **options: Any,
    ) -> DHTNode:
        """A node listening on ``host:port`` (port 0 picks a free one; see ``.port``)."""
        node = cls(key, cluster, ksize=ksize, alpha=alpha, allow_public=allow_public, **options)
        try:
            await node.listen(port, host)
        except OSError as exc:
            raise DHTError(
                f"cannot listen for DHT datagrams on {host}:{port} ({exc.strerror or exc}); "
                "choose another network.dht_port or stop the process using it"
            ) from None
        sockname = node.transport.get_extra_info("sockname")
        node.host, node.port = sockname[0], sockname[1]
        node._bootstrapper = Bootstrapper(
            node.protocol, node.node, (node.host, node.port), ksize=node.ksize, alpha=node.alpha,
            allow_public=allow_public, backoff=node.bootstrap_backoff, clock=node.clock,
            counters=node.counters,
        )
        log.info("dht listening", host=node.host, port=node.port, node_id=key.node_id[:16])
        return node

    def _create_protocol(self) -> SealedProtocol:
        return SealedProtocol(
            self.node, self.storage, self.ksize, settings=self.settings, counters=self.counters,
            clock=self.clock, wall_clock=self.wall_clock, spawn=self._spawn,
            clock_offsets=self.clock_offsets,
        )

    def refresh_table(self, interval: float | None = None) -> None:
        if self._stopped:
            return
        self._spawn(self._refresh_table())
        loop = asyncio.get_running_loop()
        self.refresh_loop = loop.call_later(self.refresh_interval, self.refresh_table)

    async def _refresh_table(self) -> None:
        """Refresh lonely buckets, purge expired records, republish own records.

        Unlike kademlia's, records held for others are not republished (that
        kept dead nodes' values alive forever); own records are re-sent with
        their original expiry so nodes that joined since get a copy.
        """
        crawls = []
        for node_id in self.protocol.get_refresh_ids():
            node = Node(node_id)
            nearest = self.protocol.router.find_neighbors(node, self.alpha)
            crawls.append(
                NodeSpiderCrawl(self.protocol, node, nearest, self.ksize, self.alpha).find()
            )
        await asyncio.gather(*crawls)
        self.storage.purge()
        now = self.clock()
        for key, record in list(self._own.items()):
            if record.expired(now):
                del self._own[key]
                continue
            await self._store_record(key, record)

    async def stop(self) -> None:
        """Stop listening and cancel background work. Records already stored elsewhere expire."""
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        if self._bootstrapper is not None:
            await self._bootstrapper.stop()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.protocol is not None:
            self.protocol.cancel_outstanding()
        super().stop()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._stopped:
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.counters.inc("background_errors")
            log.warning("dht background task failed", error=repr(task.exception()))

    # --------------------------------------------------------------- levels

    def peers_known(self) -> int:
        if self.protocol is None:
            return 0
        return sum(len(bucket) for bucket in self.protocol.router.buckets)

    def records_held(self) -> int:
        return len(self.storage)

    # ------------------------------------------------------------- bootstrap

    async def bootstrap(self, peers: Iterable[tuple[str, int]]) -> int:
        """Contact configured peers; returns how many answered. Unreachable ones are
        retried in the background with exponential backoff, never given up on."""
        return await self._started().bootstrap(peers)

    def add_bootstrap_peer(self, host: str, port: int) -> None:
        """A peer learned at run time (LAN beacon); refused quietly if not allowed."""
        self._started().add_peer(host, port)

    def _started(self) -> Bootstrapper:
        if self._bootstrapper is None:
            raise DHTError("the DHT node is not listening yet; build it with DHTNode.create()")
        return self._bootstrapper

    # --------------------------------------------------------------- records

    def _next_seq(self) -> int:
        # Wall-clock milliseconds, so a restarted node's records still beat
        # the ones it published before the restart.
        self._last_seq = max(self._last_seq + 1, int(self.wall_clock() * 1000))
        if self._seq_file is not None:
            try:
                atomic_write(self._seq_file, str(self._last_seq), mode=0o600)
            except OSError as exc:  # not fatal: the clock usually moves forward anyway
                log.warning("cannot persist the record sequence number", path=str(self._seq_file), error=str(exc))
        return self._last_seq

    async def put(self, key: str, value: Any, *, ttl: float) -> int:
        """Publish ``value`` under ``key`` as this node's record; returns how many nodes
        (this one included) stored it. Raises RecordError if the value is invalid or too big."""
        return await self._publish(key, value, ttl=ttl, tombstone=False)

    async def delete(self, key: str) -> None:
        """Withdraw this node's record under ``key`` (best effort): a tombstone with a newer
        seq that hides the old record until that one would have expired anyway."""
        old = self._own.pop(key, None)
        ttl = old.ttl if old is not None else MAX_TTL
        with contextlib.suppress(DHTError):
            await self._publish(key, None, ttl=ttl, tombstone=True)
        self._own.pop(key, None)

    async def leave(self, within: float = 5.0) -> None:
        """Withdraw all of this node's records (best effort, giving up after ``within`` s)."""
        keys = list(self._own)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(self.delete(k) for k in keys)), within)

    async def _publish(self, key: str, value: Any, *, ttl: float, tombstone: bool) -> int:
        if self._stopped:
            raise DHTError("DHT node is stopped; cannot publish")
        record = make_record(
            key,
            value,
            public_key=self.key.public_bytes,
            sign=self.key.sign,
            seq=self._next_seq(),
            ttl=ttl,
            issued_at=self.wall_clock(),
            tombstone=tombstone,
        )
        record = record.with_expiry(expiry_for(record, now=self.clock()))
        if not tombstone:
            self._own[key] = record
        return await self._store_record(key, record)

    async def _store_record(self, key: str, record: Record) -> int:
        dkey = digest(key)
        target = Node(dkey)
        nearest = self.protocol.router.find_neighbors(target)
        nodes: list[Node] = []
        if nearest:
            nodes = await NodeSpiderCrawl(
                self.protocol, target, nearest, self.ksize, self.alpha
            ).find()
        stored = 0
        # Keep a local copy when this node is among the k closest (always in a
        # small cluster) so later joiners receive it via welcome_if_new.
        if len(nodes) < self.ksize or self.node.distance_to(target) < max(
            n.distance_to(target) for n in nodes
        ):
            outcome = self.storage.put(dkey, record, remaining=record.remaining(self.clock()))
            stored += 1 if outcome.accepted or outcome.reason == "duplicate" else 0
        results = await asyncio.gather(*(self.protocol.call_store(n, dkey, record) for n in nodes))
        stored += sum(1 for ok, answer in results if ok and answer is True)
        return stored

    async def lookup(self, key: str) -> LookupResult:
        """Crawl toward ``key`` and merge every verified record seen (with lookup statistics)."""
        self.counters.inc("lookups")
        dkey = digest(key)
        target = Node(dkey)
        local = [r for r in self.storage.get(dkey) if r.key == key]
        nearest = self.protocol.router.find_neighbors(target)
        crawl = RecordCrawl(
            self.protocol, target, nearest, key, ksize=self.ksize, alpha=self.alpha,
            own_id=self.node.id, allow_public=self.allow_public, clock=self.clock,
            wall_clock=self.wall_clock, counters=self.counters,
        )
        if nearest:
            await crawl.find()
        return crawl.result(local)

    def forget(self, node_id: str) -> None:
        """``node_id`` refused a connection (it died): drop it from the routing table, and
        let lookups skip it for a while rather than wait ``rpc_timeout`` on it each time
        other nodes still name it. It is welcome again as soon as it sends anything."""
        if self.protocol is not None and len(node_id) == 64:
            with contextlib.suppress(ValueError):
                self.protocol.mark_unreachable(bytes.fromhex(node_id)[:DHT_ID_BYTES], UNREACHABLE_S)

    async def get(self, key: str) -> RecordSet:
        """publisher node id -> newest verified, unexpired record under ``key``."""
        return (await self.lookup(key)).records


def _read_seq(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return max(0, int(path.read_text().strip()))
    except (OSError, ValueError):
        return 0
