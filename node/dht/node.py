"""The cluster DHT node: kademlia's Server with sealed datagrams and signed multi-publisher records.

What changes from the ``kademlia``/``rpcudp`` packages, and where:

* Datagrams and identity: sealed, signed msgpack datagrams whose sender id
  must match their key (node/dht_protocol.py, format in node/dht_wire.py).
* Values. Storage holds one signed record (protocol.records) per (key,
  publisher). Records are checked on store and on every read; an older seq
  never replaces a newer one; expiry is relative to receipt, and a forwarded
  record carries the sender's remaining lifetime so nobody extends it
  (node/dht_storage.py).
* Lookups. ``find_value`` answers with both records and neighbours, and a
  lookup crawls to the k closest nodes merging every record it sees, instead
  of stopping at the first value (node/dht_routing.py).
* Republish. The hourly refresh republishes only this node's own records with
  their original expiry; records of dead nodes simply run out.
* Departure. ``delete``/``leave`` publish tombstones (newer seq, no value) that
  hide this node's records until the old copies would have expired anyway.
* Bootstrap. Configured peers that do not answer are retried forever with
  exponential backoff; peers from the LAN beacon join the same retry list
  (node/dht_bootstrap.py).

This module owns the node's public API (create, put/get/lookup, members,
bootstrap, stop, metrics); everything callers use is importable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from kademlia.crawling import NodeSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.utils import digest

from node.dht.bootstrap import Bootstrapper
from node.dht.protocol import SealedProtocol
from node.dht.routing import _RecordCrawl, _RoutingTable
from node.dht.storage import RecordStore
from node.dht.types import (
    DIRECTORY_PREFIX,
    DIRECTORY_SHARDS,
    DHTError,
    LookupResult,
    RecordSet,
    bump,
    member_key,
)
from node.dht.wire import DATAGRAM_DOMAIN, MAX_DATAGRAM, MAX_REQUEST_BYTES, RESPONSE_BUDGET
from node.identity import ClusterKeys, NodeKey
from protocol.records import (
    MAX_TTL,
    Record,
    RecordError,
    decode_record,
    expiry_for,
    make_record,
    merge_records,
)
from protocol.seal import DEFAULT_MAX_SKEW

__all__ = [
    "DATAGRAM_DOMAIN",
    "DIRECTORY_PREFIX",
    "DIRECTORY_SHARDS",
    "MAX_DATAGRAM",
    "MAX_REQUEST_BYTES",
    "RESPONSE_BUDGET",
    "DHTError",
    "DHTNode",
    "LookupResult",
    "RecordSet",
    "SealedProtocol",
    "_RoutingTable",
    "member_key",
]

log = structlog.get_logger("enjambre.dht")


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
    ) -> None:
        self.key = key
        self.cluster = cluster
        self.allow_public = allow_public
        self.rpc_timeout = rpc_timeout
        self.max_skew = max_skew
        self.refresh_interval = refresh_interval
        self.clock = clock
        self.wall_clock = wall_clock
        self.bootstrap_backoff = bootstrap_backoff
        self._metrics: dict[str, int] = dict.fromkeys(
            (
                "peers_known",
                "records_held",
                "requests_sent",
                "requests_received",
                "responses_received",
                "rpc_failures",
                "datagrams_sent",
                "datagrams_received",
                "bytes_sent",
                "bytes_received",
                "dropped_total",
                "lookups",
            ),
            0,
        )
        self._last_stale_warning = -math.inf
        super().__init__(ksize=ksize, alpha=alpha, node_id=key.dht_id)
        # Set after: kademlia's ``storage or ForgetfulStorage()`` would treat an
        # empty RecordStore as missing.
        self.storage: RecordStore = RecordStore(clock=clock)
        self.node_id = key.node_id
        self.host = ""
        self.port = 0
        self._own: dict[str, Record] = {}
        self._last_seq = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bootstrapper = Bootstrapper(self)
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
        log.info("dht listening", host=node.host, port=node.port, node_id=key.node_id[:16])
        return node

    def _create_protocol(self) -> SealedProtocol:
        return SealedProtocol(self, self.node, self.storage, self.ksize)

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
        bootstrap_task = self._bootstrapper.task
        if bootstrap_task is not None:
            bootstrap_task.cancel()
        tasks = [*self._tasks, *([bootstrap_task] if bootstrap_task else [])]
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.protocol is not None:
            self.protocol.cancel_outstanding()
        super().stop()

    def _spawn(self, coro: Any) -> None:
        if self._stopped:
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            bump(self._metrics, "background_errors")
            log.warning("dht background task failed", error=repr(task.exception()))

    # --------------------------------------------------------------- metrics

    @property
    def metrics(self) -> dict[str, int]:
        """Counters for the Prometheus endpoint (a plain dict; read it, do not keep it)."""
        self._metrics["peers_known"] = self.peers_known()
        self._metrics["records_held"] = len(self.storage)
        return self._metrics

    def peers_known(self) -> int:
        if self.protocol is None:
            return 0
        return sum(len(bucket) for bucket in self.protocol.router.buckets)

    def _drop(self, reason: str) -> None:
        bump(self._metrics, f"dropped_{reason}")
        bump(self._metrics, "dropped_total")

    def _warn_stale(self, address: tuple[str, int], detail: str) -> None:
        # A peer with a wrong clock is a setup problem the operator must see,
        # but not once per datagram.
        now = self.clock()
        if now - self._last_stale_warning >= 60:
            self._last_stale_warning = now
            log.warning(
                "dht peer clock out of range", peer=f"{address[0]}:{address[1]}", detail=detail
            )

    # ------------------------------------------------------------- bootstrap

    async def bootstrap(self, peers: Iterable[tuple[str, int]]) -> int:
        """Contact configured peers; returns how many answered. Unreachable ones are
        retried in the background with exponential backoff, never given up on."""
        return await self._bootstrapper.bootstrap(peers)

    def add_bootstrap_peer(self, host: str, port: int) -> None:
        """A peer learned at run time (LAN beacon); refused quietly if not allowed."""
        self._bootstrapper.add_peer(host, port)

    # --------------------------------------------------------------- records

    def _next_seq(self) -> int:
        # Wall-clock milliseconds, so a restarted node's records still beat
        # the ones it published before the restart.
        self._last_seq = max(self._last_seq + 1, int(self.wall_clock() * 1000))
        return self._last_seq

    def _accept_record(self, dkey: bytes, data: bytes, remaining: float) -> bool:
        try:
            record = decode_record(data)
        except RecordError as exc:
            bump(self._metrics, f"records_rejected_{exc.reason}")
            return False
        if digest(record.key) != dkey:
            bump(self._metrics, "records_rejected_wrong_key")
            return False
        outcome = self.storage.put(dkey, record, remaining=remaining)
        if outcome.accepted:
            bump(self._metrics, "records_stored")
        else:
            bump(self._metrics, f"records_rejected_{outcome.reason}")
        return bool(outcome.accepted)

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
        bump(self._metrics, "lookups")
        dkey = digest(key)
        target = Node(dkey)
        local = [r for r in self.storage.get(dkey) if r.key == key]
        nearest = self.protocol.router.find_neighbors(target)
        crawl = _RecordCrawl(self, target, nearest, key)
        if nearest:
            await crawl.find()
        merged = merge_records([*local, *crawl.records], now=self.clock())
        records = RecordSet({p: r for p, r in merged.items() if not r.tombstone})
        records.truncated = crawl.truncated
        return LookupResult(
            records=records,
            truncated=crawl.truncated,
            rounds=crawl.rounds,
            queried=crawl.queried,
            responded=crawl.responded,
            first_hit_round=crawl.first_hit_round,
            rejected=crawl.rejected,
        )

    async def get(self, key: str) -> RecordSet:
        """publisher node id -> newest verified, unexpired record under ``key``."""
        return (await self.lookup(key)).records

    async def publish_member(self, value: Any, *, ttl: float) -> None:
        """Publish this node's capability record in the cluster directory."""
        await self.put(member_key(self.node_id), value, ttl=ttl)

    async def members(self) -> RecordSet:
        """All directory records, read from the 16 shards concurrently."""
        results = await asyncio.gather(
            *(self.get(f"{DIRECTORY_PREFIX}{s}") for s in DIRECTORY_SHARDS)
        )
        merged = RecordSet()
        for shard in results:
            merged.update(shard)
            merged.truncated = merged.truncated or shard.truncated
        return merged
