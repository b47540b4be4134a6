"""Impaired links without sch_netem: a userspace Ethernet bridge that delays, drops and rate-limits.

Kernels without sch_netem (CI's minimal Firecracker kernel among them) cannot run
``tc qdisc ... netem``. In its place node/testing/netns.py leaves the hub namespace
without a Linux bridge and starts this module as a separate process inside it
(``python -I impair.py --port p0 --port p1 ...``; standard library only, so it needs no
package imports). It opens an AF_PACKET socket on each hub-side veth and forwards every
Ethernet frame received on one port to the port its destination MAC was last seen on
(broadcast, multicast and unknown unicast: every other port), shaped once per frame as
netem on the sending host's link would shape it:

- loss: dropped with probability ``loss`` (one seeded RNG per ingress port, so a run's
  decisions repeat for the same frames);
- rate: each ingress port serializes its frames at ``rate_mbit`` (netem's ``rate``: a
  frame leaves the link len*8/rate after the previous one has), and a frame that finds
  ``queue_frames`` frames still waiting is dropped as by a full queue;
- delay: a frame is sent ``delay_ms`` after it finishes serializing (a heap keyed on send time).

Frames the bridge sends are not read back: a socket never sees its own sends, other
ports' sockets are bound elsewhere, and anything with pkttype PACKET_OUTGOING is skipped.
veth hands AF_PACKET GSO super-frames and frames with partial checksums unless its
offloads are off, so ``disable_offloads`` (the SIOCETHTOOL ioctl; no ethtool binary)
turns off tx checksumming, TSO, GSO and GRO on both ends of every veth first.

The forwarding decisions are a pure class (``Forwarder``: time is an argument); the
process is a thin select() loop around it. Its stdin is its control line: ``stats``
answers a JSON line of counters, EOF (the parent gone, or ``BridgeProcess.stop``) ends it.

Measured on the 2-core development VM (Python 3.11, another test suite busy on both
cores, load average near 4): with no impairment it forwards 320-530 Mbit/s of TCP and
at least 37,000 UDP frames of 1514 bytes a second (450 Mbit/s; the sender, not the
bridge, was the limit), so a 100 Mbit/s link is shaped by its rate, not by the bridge
(TCP over 5 ms, 0 % loss, 100 Mbit/s: 93 Mbit/s). On such a busy machine about 1 % of
frames leave more than 1 ms late (at worst about 5 ms; ``late_1ms`` and ``late_max_ms``
in its counters), so round trips vary a little more than netem's.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import heapq
import json
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["BridgeProcess", "Forwarder", "Impairment", "disable_offloads", "offloads", "userspace_bridge"]

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
_SOL_PACKET = 263
_PACKET_ADD_MEMBERSHIP = 1
_PACKET_MR_PROMISC = 1
_PACKET_IGNORE_OUTGOING = 23  # Linux 4.20+; the pkttype check below covers older kernels
_SO_RCVBUFFORCE = 33
_SO_SNDBUFFORCE = 32
_SOCKET_BUFFER = 4 << 20  # room for a burst while the bridge waits for a core
_DRAIN = 256  # frames read from one port before due frames are sent again

SIOCETHTOOL = 0x8946
# Legacy ethtool get/set pairs (struct ethtool_value); each still maps onto the feature flags.
_ETHTOOL = {"tx-checksumming": (0x16, 0x17), "tso": (0x1E, 0x1F), "gso": (0x23, 0x24), "gro": (0x2B, 0x2C)}


# ---------------------------------------------------------------------- settings

_TIME = {"s": 1e3, "sec": 1e3, "secs": 1e3, "ms": 1.0, "msec": 1.0, "msecs": 1.0, "us": 1e-3, "usec": 1e-3,
         "usecs": 1e-3, "": 1e-3}  # tc reads a bare number as microseconds
_RATE = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3, "bps": 8e-6, "kbps": 8e-3, "mbps": 8.0,
         "gbps": 8e3}  # to Mbit/s; tc's "bps" is bytes per second


@dataclass(frozen=True)
class Impairment:
    """What every host's link does to the frames it sends (netem's delay, loss and rate).
    ``rate_mbit`` None: no limit. ``queue_frames``: frames a link holds waiting for the
    rate before it drops. ``extra``: netem settings the userspace bridge cannot apply
    (from ``from_netem``; netem itself still gets the whole ``spec``)."""

    delay_ms: float = 5.0
    loss: float = 0.01
    rate_mbit: float | None = 100.0
    seed: int = 0
    queue_frames: int = 256
    spec: str = field(default="", compare=False)
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or not 0 <= self.loss <= 1 or (self.rate_mbit is not None and self.rate_mbit <= 0):
            raise ValueError(f"impossible impairment {self}: delay must be >= 0, loss in [0, 1], rate > 0")
        if self.queue_frames < 1:
            raise ValueError(f"impossible impairment {self}: queue_frames must be at least 1")

    def netem(self) -> str:
        """The ``tc qdisc add ... netem`` arguments for the same impairment."""
        if self.spec:
            return self.spec
        parts = [f"delay {self.delay_ms:g}ms", f"loss {100 * self.loss:g}%"]
        if self.rate_mbit is not None:
            parts.append(f"rate {self.rate_mbit:g}mbit")
        return " ".join(parts)

    @classmethod
    def from_netem(cls, spec: str, *, seed: int = 0) -> Impairment:
        """Read tc netem arguments ("delay 5ms loss 1% rate 100mbit"). Settings other than
        delay, loss and rate (jitter, reordering, ...) land in ``extra``."""
        words = spec.split()
        delay, loss, rate = 0.0, 0.0, None
        extra: list[str] = []
        i = 0
        while i < len(words):
            key, value = words[i], words[i + 1] if i + 1 < len(words) else ""
            if key == "delay" and (m := re.fullmatch(r"([\d.]+)([a-z]*)", value)) and m[2] in _TIME:
                delay = float(m[1]) * _TIME[m[2]]
            elif key == "loss" and value == "random" and i + 2 < len(words):
                words.pop(i + 1)
                continue
            elif key == "loss" and (m := re.fullmatch(r"([\d.]+)(%?)", value)):
                loss = float(m[1]) / (100 if m[2] else 1)
            elif key == "rate" and (m := re.fullmatch(r"([\d.]+)([a-z]*)", value.lower())) and m[2] in _RATE:
                rate = float(m[1]) * _RATE[m[2]]
            else:
                extra.append(key)
                i += 1
                continue
            i += 2
        return cls(delay_ms=delay, loss=loss, rate_mbit=rate, seed=seed, spec=spec, extra=tuple(extra))


# ---------------------------------------------------------------------- the pure core

@dataclass
class Counts:
    received: int = 0  # frames read from the ports
    lost: int = 0  # dropped by the loss draw
    queue_full: int = 0  # dropped because the link's queue was full
    flooded: int = 0  # broadcast, multicast or unknown destination
    sent: int = 0  # frames written to ports (a flooded frame counts once per port)
    send_errors: int = 0
    oversize: int = 0  # refused as larger than the MTU: offloads were on
    late_max_ms: float = 0.0  # the worst time past its due time a frame was sent at
    late_1ms: int = 0  # sends more than 1 ms past their due time (the bridge waited for a core)


class Forwarder:
    """A learning switch whose ports are links with ``impairment``. ``receive`` files a
    frame read at ``now``; ``due(now)`` hands back the (port, frame) sends whose time has
    come; ``next_due`` says when the next one comes."""

    def __init__(self, ports: int, impairment: Impairment) -> None:
        self.ports = ports
        self.impairment = impairment
        self.macs: dict[bytes, int] = {}
        self.counts = Counts()
        self._bit_s = None if impairment.rate_mbit is None else 1e-6 / impairment.rate_mbit
        self._rngs = [random.Random(f"{impairment.seed}/{p}") for p in range(ports)]
        self._busy_until = [0.0] * ports
        self._waiting: list[deque[float]] = [deque() for _ in range(ports)]  # serialization end times
        self._heap: list[tuple[float, int, tuple[int, ...], bytes]] = []
        self._seq = 0

    def receive(self, port: int, frame: bytes, now: float) -> None:
        if len(frame) < 14:
            return
        self.counts.received += 1
        src, dst = frame[6:12], frame[0:6]
        if not src[0] & 1:
            self.macs[src] = port
        out = self.macs.get(dst) if not dst[0] & 1 else None
        if out == port:
            return  # for a host behind the port it came in on (a switch filters it too)
        if out is None:
            self.counts.flooded += 1
            outs = tuple(p for p in range(self.ports) if p != port)
        else:
            outs = (out,)
        imp = self.impairment
        if imp.loss and self._rngs[port].random() < imp.loss:
            self.counts.lost += 1
            return
        leaves = now
        if self._bit_s is not None:
            waiting = self._waiting[port]
            while waiting and waiting[0] <= now:
                waiting.popleft()
            if len(waiting) >= imp.queue_frames:
                self.counts.queue_full += 1
                return
            leaves = max(now, self._busy_until[port]) + len(frame) * 8 * self._bit_s
            self._busy_until[port] = leaves
            waiting.append(leaves)
        self._seq += 1
        heapq.heappush(self._heap, (leaves + imp.delay_ms / 1e3, self._seq, outs, frame))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[tuple[int, bytes, float]]:
        """(port, frame, due time) for each send whose time is up, earliest first."""
        out: list[tuple[int, bytes, float]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, ports, frame = heapq.heappop(heap)
            out.extend((p, frame, when) for p in ports)
        return out


# ---------------------------------------------------------------------- offloads

def _ethtool(sock: socket.socket, ifname: str, cmd: int, data: int = 0) -> int:
    value = ctypes.create_string_buffer(struct.pack("II", cmd, data), 8)
    request = struct.pack("16sP", ifname.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, request)
    return int(struct.unpack("II", value.raw)[1])


def disable_offloads(sock: socket.socket, ifname: str) -> None:
    """Turn off tx checksumming, TSO, GSO and GRO on ``ifname`` (in ``sock``'s namespace),
    so AF_PACKET sees MTU-sized frames with complete checksums."""
    for name, (_, set_cmd) in _ETHTOOL.items():
        try:
            _ethtool(sock, ifname, set_cmd, 0)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot turn off {name} on {ifname} (SIOCETHTOOL): {exc.strerror}") from exc


def offloads(sock: socket.socket, ifname: str) -> dict[str, bool]:
    """Which of tx checksumming, TSO, GSO and GRO are on for ``ifname``."""
    return {name: bool(_ethtool(sock, ifname, get_cmd)) for name, (get_cmd, _) in _ETHTOOL.items()}


# ---------------------------------------------------------------------- the process

def _open_port(name: str) -> socket.socket:
    # Protocol 0 receives nothing until bind names the interface: no frame from elsewhere slips in.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((name, ETH_P_ALL))
    ifindex = socket.if_nametoindex(name)
    sock.setsockopt(_SOL_PACKET, _PACKET_ADD_MEMBERSHIP, struct.pack("iHH8s", ifindex, _PACKET_MR_PROMISC, 0, b""))
    with contextlib.suppress(OSError):
        sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
    for opt, fallback in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, fallback, _SOCKET_BUFFER)
    sock.setblocking(False)
    return sock


def serve(names: Sequence[str], impairment: Impairment, control: IO[str], report: IO[str]) -> Counts:
    """Forward between the ports ``names`` until ``control`` reaches EOF; each ``stats``
    line read from it is answered with a JSON line of counters on ``report``."""
    socks = [_open_port(n) for n in names]
    fwd = Forwarder(len(socks), impairment)
    counts = fwd.counts
    ports = {s.fileno(): i for i, s in enumerate(socks)}
    control_fd = control.fileno()
    watched = [control_fd, *ports]
    print("ready", file=report, flush=True)
    while True:
        nxt = fwd.next_due()
        timeout = 0.5 if nxt is None else max(0.0, nxt - time.monotonic())
        readable, _, _ = select.select(watched, [], [], timeout)
        for fd in readable:
            if fd == control_fd:
                line = control.readline()
                if not line:
                    return counts
                if line.strip() == "stats":
                    print(json.dumps(counts.__dict__), file=report, flush=True)
                continue
            port, sock = ports[fd], socks[ports[fd]]
            for _ in range(_DRAIN):
                try:
                    frame, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                fwd.receive(port, frame, time.monotonic())
        now = time.monotonic()
        for port, frame, when in fwd.due(now):
            late = (now - when) * 1e3
            if late > 1.0:
                counts.late_1ms += 1
                counts.late_max_ms = max(counts.late_max_ms, late)
            try:
                socks[port].send(frame)
                counts.sent += 1
            except OSError as exc:
                counts.send_errors += 1
                if exc.errno == errno.EMSGSIZE:  # a GSO super-frame: offloads were on
                    counts.oversize += 1


class BridgeProcess:
    """The bridge running in namespace ``namespace`` over ports ``names`` (a child process:
    ``stats()`` asks it for its counters, ``stop()`` ends it and returns the last ones)."""

    def __init__(self, namespace: str, names: Sequence[str], impairment: Impairment, *, timeout: float = 10.0) -> None:
        if impairment.extra:
            raise ValueError(f"the userspace bridge applies only delay, loss and rate, not netem's "
                             f"{', '.join(impairment.extra)} (in {impairment.spec!r})")
        self.namespace, self.names, self.impairment = namespace, list(names), impairment
        self.final: dict[str, Any] | None = None
        self._stderr = ""
        args = [f"--delay-ms={impairment.delay_ms}", f"--loss={impairment.loss}", f"--seed={impairment.seed}",
                f"--queue-frames={impairment.queue_frames}", *(f"--port={n}" for n in names)]
        if impairment.rate_mbit is not None:
            args.append(f"--rate-mbit={impairment.rate_mbit}")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-I", os.path.abspath(__file__), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        if self._line(timeout) != "ready":
            self.stop()
            raise RuntimeError(f"the userspace bridge in {namespace} did not start: {self.errors() or '(no message)'}")

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else ""

    def errors(self) -> str:
        """What it wrote to stderr (known once it has ended)."""
        return self._stderr

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """Its counters now (``Counts`` as a dict)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        line = self._line(timeout)
        if not line:
            raise RuntimeError(f"the userspace bridge did not answer: {self.errors() or '(no message)'}")
        return dict(json.loads(line))

    def stop(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """End it (its stdin closes; SIGKILL if it lingers) and return its final counters."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            with contextlib.suppress(ValueError):
                lines = [ln for ln in self.proc.stdout.read().splitlines() if ln.startswith("{")]
                self.final = json.loads(lines[-1]) if lines else None
            self.proc.stdout.close()
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self._stderr = self.proc.stderr.read().strip()
            self.proc.stderr.close()
        return self.final


@contextlib.contextmanager
def userspace_bridge(namespace: str, names: Sequence[str], impairment: Impairment) -> Iterator[BridgeProcess]:
    """The bridge process for the duration of the block; always stopped when it ends."""
    bridge = BridgeProcess(namespace, names, impairment)
    try:
        yield bridge
    finally:
        bridge.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="userspace impaired Ethernet bridge (run by node/testing/netns.py)")
    p.add_argument("--port", action="append", required=True, help="an interface to bridge (repeat)")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0, help="fraction of frames dropped")
    p.add_argument("--rate-mbit", type=float, help="each port's sending rate (default: none)")
    p.add_argument("--queue-frames", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    imp = Impairment(delay_ms=args.delay_ms, loss=args.loss, rate_mbit=args.rate_mbit, seed=args.seed,
                     queue_frames=args.queue_frames)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, -10)  # its delays stay near 5 ms on a busy machine
    try:
        counts = serve(args.port, imp, sys.stdin, sys.stdout)
    except KeyboardInterrupt:
        return 0
    print(json.dumps(counts.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
