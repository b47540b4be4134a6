"""Tools the attack tests use against real daemons: a hand-driven DHT speaker, metrics, memory.

An attacker here is an insider (it holds the cluster secret and mints keys at will)
unless a test says otherwise. Everything talks to 127.0.0.x only.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from node.identity import ClusterKeys, NodeKey, parse_secret
from node.testing.localcluster import LocalCluster, LocalNode
from protocol.dht import DhtRequest, build_datagram, pack_body, parse_datagram, receiver_tag
from protocol.seal import ReplayGuard

__all__ = ["DhtSpeaker", "cluster_keys", "metric", "rss"]


def cluster_keys(cluster: LocalCluster) -> ClusterKeys:
    return ClusterKeys.from_secret(parse_secret(cluster.secret_file.read_text()))


def metric(node: LocalNode, name: str, **labels: str) -> float:
    """One sample of the daemon's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://{node.api}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def rss(node: LocalNode) -> int:
    assert node.proc is not None
    return int(psutil.Process(node.proc.pid).memory_info().rss)


class DhtSpeaker(asyncio.DatagramProtocol):
    """A UDP endpoint that speaks the sealed DHT format by hand, as any identity it likes."""

    def __init__(self, keys: ClusterKeys, key: NodeKey | None = None, *, answer_pings: bool = False) -> None:
        self.keys = keys
        self.key = key or NodeKey.generate()
        self.answer_pings = answer_pings
        self.transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] = ("", 0)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.received: asyncio.Queue[Any] = asyncio.Queue()
        self._replay = ReplayGuard(60)

    @classmethod
    async def open(cls, keys: ClusterKeys, *, host: str = "127.0.0.1", **kw: Any) -> DhtSpeaker:
        speaker = cls(keys, **kw)
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: speaker, local_addr=(host, 0))
        return speaker

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.address = transport.get_extra_info("sockname")[:2]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def send_raw(self, message: list[Any], to: tuple[str, int], *, sealed_for: tuple[str, int] | None = None) -> int:
        assert self.transport is not None
        datagram = build_datagram(
            pack_body(message), seal_key=self.keys.dht_key, public_key=self.key.public_bytes,
            sign=self.key.sign, now=time.time(), receiver=receiver_tag(*(sealed_for or to)),
        )
        self.transport.sendto(datagram, to)
        self.bytes_sent += len(datagram)
        return len(datagram)

    def request(self, to: tuple[str, int], name: str, *args: Any, **kw: Any) -> bytes:
        msg_id = os.urandom(20)
        self.send_raw([0, msg_id, name, [self.key.dht_id, *args]], to, **kw)
        return msg_id

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.bytes_received += len(data)
        message = parse_datagram(data, seal_key=self.keys.dht_key, now=time.time(), max_skew=60,
                                 replay=self._replay, receiver=receiver_tag(*self.address))
        source = (str(addr[0]), int(addr[1]))
        if self.answer_pings and isinstance(message, DhtRequest) and message.name == "ping":
            self.send_raw([1, message.msg_id, self.key.dht_id], source)
        self.received.put_nowait((message, source, len(data)))

    async def drain(self, wait: float) -> list[Any]:
        """Everything that arrives within ``wait`` seconds."""
        got: list[Any] = []
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return got
            try:
                got.append(await asyncio.wait_for(self.received.get(), left))
            except TimeoutError:
                return got
