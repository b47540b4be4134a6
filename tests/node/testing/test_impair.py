"""Tests for node/testing/impair.py: reading netem settings, the forwarder's decisions
(learning, flooding, delay, loss, rate, a full queue) with time as an argument, and the
userspace impaired bridge between two namespaces: round trips of twice the delay, about
1 % loss each way, TCP intact and under the rate, ARP over the bridge. The namespace tests
run the bridge even where the kernel has netem, and skip unless root with working
namespaces and AF_PACKET."""

from __future__ import annotations

import hashlib
import os
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from node.testing.impair import Forwarder, Impairment, offloads
from node.testing.netns import Host, Lan, bridge_unusable_reason, lan, socket_in

A, B, C = (bytes([2, 0, 0, 0, 0, n]) for n in (1, 2, 3))
BROADCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, size: int = 60) -> bytes:
    return (dst + src + b"\x08\x00").ljust(size, b"\0")


# ---------------------------------------------------------------------- settings

@pytest.mark.parametrize(("spec", "delay_ms", "loss", "rate_mbit", "extra"), [
    ("delay 5ms loss 1% rate 100mbit", 5.0, 0.01, 100.0, ()),
    ("delay 500us loss random 0.5% rate 12500kbps", 0.5, 0.005, 100.0, ()),
    ("delay 2000 loss 0.1", 2.0, 0.1, None, ()),  # tc: a bare time is microseconds, a bare loss a fraction
    ("delay 5ms 1ms distribution normal", 5.0, 0.0, None, ("1ms", "distribution", "normal")),
    ("rate 1gbit duplicate 1%", 0.0, 0.0, 1000.0, ("duplicate", "1%")),
])
def test_netem_settings_are_read(spec: str, delay_ms: float, loss: float, rate_mbit: float | None,
                                 extra: tuple[str, ...]) -> None:
    imp = Impairment.from_netem(spec)
    assert (imp.delay_ms, imp.loss, imp.rate_mbit) == pytest.approx((delay_ms, loss, rate_mbit))
    assert imp.extra == extra
    assert imp.netem() == spec  # netem itself gets every setting


def test_an_impairment_says_itself_as_netem() -> None:
    assert Impairment(delay_ms=5, loss=0.01, rate_mbit=100).netem() == "delay 5ms loss 1% rate 100mbit"
    assert Impairment(delay_ms=1, loss=0, rate_mbit=None).netem() == "delay 1ms loss 0%"


@pytest.mark.parametrize("kwargs", [{"loss": 1.5}, {"delay_ms": -1}, {"rate_mbit": 0}, {"queue_frames": 0}])
def test_an_impossible_impairment_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="impossible impairment"):
        Impairment(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the forwarder

def test_it_floods_until_it_learns_then_forwards_to_one_port() -> None:
    fwd = Forwarder(3, Impairment(delay_ms=5, loss=0, rate_mbit=None))
    fwd.receive(0, frame(B, A), now=1.0)  # B unknown: every other port
    fwd.receive(1, frame(A, B), now=1.0)  # A learned on port 0
    fwd.receive(2, frame(BROADCAST, C), now=1.0)
    fwd.receive(0, frame(A, A), now=1.0)  # to a host behind its own port: filtered
    assert fwd.next_due() == pytest.approx(1.005)
    assert fwd.due(1.004) == []
    sent = fwd.due(1.005)
    assert [(port, f[:12]) for port, f, _ in sent] == [
        (1, B + A), (2, B + A), (0, A + B), (0, BROADCAST + C), (1, BROADCAST + C)]
    assert fwd.macs == {A: 0, B: 1, C: 2}
    assert (fwd.counts.received, fwd.counts.flooded, fwd.next_due()) == (4, 2, None)


def test_each_link_serializes_at_its_rate_and_drops_when_its_queue_is_full() -> None:
    # 1 Mbit/s: a 1250-byte frame takes 10 ms on the wire, then 5 ms of delay.
    fwd = Forwarder(2, Impairment(delay_ms=5, loss=0, rate_mbit=1, queue_frames=3))
    for _ in range(5):
        fwd.receive(0, frame(BROADCAST, A, 1250), now=0.0)
    fwd.receive(1, frame(BROADCAST, B, 1250), now=0.0)  # the other link is not held up
    assert fwd.counts.queue_full == 2
    assert [round(when, 4) for _, _, when in fwd.due(1.0)] == [0.015, 0.015, 0.025, 0.035]
    fwd.receive(0, frame(BROADCAST, A, 1250), now=0.021)  # two have left the queue: room again
    assert [round(when, 4) for _, _, when in fwd.due(1.0)] == [0.045]
    fwd.receive(0, frame(BROADCAST, A, 1250), now=2.0)  # an idle link sends at once
    assert [round(when, 4) for _, _, when in fwd.due(3.0)] == [2.015]


def test_loss_is_about_its_share_and_repeats_with_the_seed() -> None:
    def drops(seed: int) -> list[int]:
        fwd = Forwarder(2, Impairment(delay_ms=0, loss=0.01, rate_mbit=None, seed=seed))
        lost = []
        for i in range(20000):
            before = fwd.counts.lost
            fwd.receive(i % 2, frame(BROADCAST, A if i % 2 == 0 else B), now=0.0)
            if fwd.counts.lost > before:
                lost.append(i)
        return lost

    assert 160 <= len(drops(1)) <= 240
    assert drops(1) == drops(1)
    assert drops(1) != drops(2)


# ---------------------------------------------------------------------- over namespaces

SPEC = Impairment(delay_ms=5, loss=0.01, rate_mbit=100, seed=3)


@pytest.fixture(scope="module")
def net() -> Iterator[Lan]:
    reason = bridge_unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    with lan(2, "10.79.3", "i", SPEC, via="userspace") as made:
        yield made


def _udp(host: Host, port: int = 0) -> socket.socket:
    sock = socket_in(host.namespace, socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind((host.address, port))
    return sock


def _round_trips(a: Host, b: Host, count: int, timeout: float = 1.5) -> list[float]:
    """Seconds each answered datagram took from a to b's echo and back."""
    server, client = _udp(b), _udp(a)
    server.settimeout(0.2)
    client.settimeout(timeout)
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(2048)
            except TimeoutError:
                continue
            server.sendto(data, peer)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    rtts = []
    try:
        for i in range(count):
            tag = f"ping {i}".encode()
            sent = time.monotonic()
            client.sendto(tag, server.getsockname())
            try:
                while client.recv(2048) != tag:
                    pass
            except TimeoutError:
                continue  # lost one way or the other
            rtts.append(time.monotonic() - sent)
    finally:
        stop.set()
        thread.join(2)
        server.close()
        client.close()
    return rtts


def _neighbours(host: Host) -> str:
    return subprocess.run(["ip", "-n", host.namespace, "neigh", "show"], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.netns
def test_hosts_find_each_other_by_arp_with_offloads_off(net: Lan) -> None:
    a, b = net.hosts
    assert net.shaping == "userspace" and net.bridge is not None
    assert "PERMANENT" not in _neighbours(a) + _neighbours(b)  # no static entries
    for host in (a, b):
        with socket_in(host.namespace, socket.AF_INET, socket.SOCK_DGRAM) as knobs:
            assert offloads(knobs, host.interface) == dict.fromkeys(
                ("tx-checksumming", "tso", "gso", "gro"), False)
    assert len(_round_trips(a, b, 5, timeout=3.0)) >= 3  # the first waits for ARP (retried if lost)
    mac_b = subprocess.run(["ip", "-n", b.namespace, "-br", "link", "show", b.interface], capture_output=True,
                           text=True, check=True).stdout.split()[2]
    assert mac_b in _neighbours(a)
    stats = net.bridge.stats()
    assert stats["flooded"] >= 1 and stats["oversize"] == stats["send_errors"] == 0


@pytest.mark.netns
def test_a_round_trip_takes_twice_the_delay(net: Lan) -> None:
    a, b = net.hosts
    rtts = _round_trips(a, b, 40)
    assert len(rtts) >= 30
    assert 0.009 <= statistics.median(rtts) <= 0.030, rtts


def _burst_loss(sender: Host, receiver: Host, count: int = 2000) -> float:
    rx, tx = _udp(receiver), _udp(sender)
    try:
        for i in range(count):
            tx.sendto(i.to_bytes(4, "big").ljust(200, b"."), rx.getsockname())
            if i % 20 == 19:
                time.sleep(0.002)  # about 10,000 datagrams/s: under the rate, no queue builds
        time.sleep(0.3)
        rx.setblocking(False)
        seen = set()
        while True:
            try:
                seen.add(int.from_bytes(rx.recv(2048)[:4], "big"))
            except BlockingIOError:
                break
        return 1 - len(seen) / count
    finally:
        rx.close()
        tx.close()


@pytest.mark.netns
def test_a_burst_loses_about_one_percent_each_way(net: Lan) -> None:
    assert net.bridge is not None
    a, b = net.hosts
    _round_trips(a, b, 3)  # both neighbours resolved, so the burst is all that crosses
    before = net.bridge.stats()
    there, back = _burst_loss(a, b), _burst_loss(b, a)
    after = net.bridge.stats()
    assert 0.002 <= there <= 0.03 and 0.002 <= back <= 0.03, (there, back, after)
    assert after["queue_full"] == before["queue_full"], after


def _transfer(a: Host, b: Host, data: bytes, timeout: float = 20.0) -> float:
    """Send ``data`` from a to b over TCP; check it arrived intact; its seconds."""
    listener = socket_in(b.namespace)
    listener.bind((b.address, 0))
    listener.listen()
    listener.settimeout(timeout)
    got: dict[str, object] = {}

    def sink() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout)
                digest, size = hashlib.sha256(), 0
                while chunk := conn.recv(1 << 16):
                    digest.update(chunk)
                    size += len(chunk)
            got.update(digest=digest.hexdigest(), size=size, at=time.monotonic())
        except OSError as exc:
            got["error"] = exc

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    with socket_in(a.namespace) as sender:
        sender.settimeout(timeout)
        sender.connect(listener.getsockname())
        started = time.monotonic()
        sender.sendall(data)
    thread.join(timeout)
    listener.close()
    assert "error" not in got and not thread.is_alive(), got
    assert (got["size"], got["digest"]) == (len(data), hashlib.sha256(data).hexdigest())
    return float(got["at"]) - started  # type: ignore[arg-type]


@pytest.mark.netns
def test_tcp_arrives_intact_under_the_rate(net: Lan) -> None:
    a, b = net.hosts
    data = os.urandom(4 << 20)
    seconds = _transfer(a, b, data)
    assert len(data) * 8 / seconds / 1e6 <= 100 * 1.05


@pytest.mark.netns
def test_a_slow_link_holds_tcp_to_its_rate_and_the_bridge_goes_with_the_block(net: Lan) -> None:
    with lan(2, "10.79.4", "j", Impairment(delay_ms=1, loss=0, rate_mbit=20), via="userspace") as slow:
        seconds = _transfer(*slow.hosts, os.urandom(3 << 20))
        bridge = slow.bridge
        assert bridge is not None and bridge.proc.poll() is None
    assert (3 << 20) * 8 / seconds / 1e6 <= 20 * 1.05
    assert bridge.proc.returncode is not None  # a separate process, stopped with the block
    assert bridge.final is not None and bridge.final["sent"] > 2000 and bridge.final["oversize"] == 0
    assert subprocess.run(["ip", "netns", "pids", slow.hub], capture_output=True).returncode != 0
