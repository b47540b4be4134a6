"""Hosts in network namespaces for tests and benchmarks: a bridge in a private hub namespace plus N nodes.

Addresses exist only inside the namespaces the test made; the host's own
interfaces and routes are never touched. Everything is deleted on exit. A process
outside reaches a host's loopback with ``socket_in`` (a socket made inside its
namespace), and ``impair`` shapes a host's link with tc netem.

Given an ``Impairment`` (delay, loss, rate), ``lan`` and ``bridged_hosts`` shape every
host's link with tc netem where the kernel has sch_netem, and otherwise replace the
Linux bridge with node/testing/impair.py's userspace bridge, a process in the hub
namespace that forwards between the hub-side veths with the same impairment
(``Lan.shaping`` says which; ``impairment_unusable_reason`` says when neither works).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from node.testing.impair import BridgeProcess, Impairment, disable_offloads, userspace_bridge

__all__ = ["Host", "Impairment", "Lan", "bridge_unusable_reason", "bridged_hosts", "impair",
           "impairment_unusable_reason", "lan", "netem_unusable_reason", "netns_unusable_reason", "socket_in"]

log = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000
Shaping = Literal["none", "netem", "userspace"]


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def netns_unusable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    probe = f"enjprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"`ip netns` does not work here ({exc})"
    return None


def netem_unusable_reason() -> str | None:
    """Why ``tc qdisc ... netem`` cannot shape links here (no root, no namespaces, no
    ``tc``, a kernel without sch_netem), or None when it can."""
    reason = netns_unusable_reason()
    if reason is not None:
        return reason
    if shutil.which("tc") is None:
        return "needs the `tc` command (iproute2)"
    probe = f"enjnetem{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        _run("ip", "-n", probe, "link", "set", "a0", "up")
        out = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "a0", "root", "netem",
                              "delay", "1ms"], capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            return f"tc netem does not work here: {out.stderr.strip() or out.stdout.strip()} (is sch_netem loaded?)"
    except (subprocess.SubprocessError, OSError) as exc:
        return f"cannot probe tc netem ({exc})"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return None


def bridge_unusable_reason() -> str | None:
    """Why the userspace impaired bridge cannot run here (no root or namespaces, no
    AF_PACKET, veth offloads that cannot be turned off), or None when it can."""
    reason = netns_unusable_reason()
    if reason is not None:
        return reason
    probe = f"enjbrg{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        with socket_in(probe, socket.AF_INET, socket.SOCK_DGRAM) as knobs:
            disable_offloads(knobs, "a0")
        socket_in(probe, socket.AF_PACKET, socket.SOCK_RAW).close()
    except (subprocess.SubprocessError, OSError) as exc:
        return f"the userspace impaired bridge cannot run here ({exc})"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return None


def impairment_unusable_reason() -> str | None:
    """Why links cannot be impaired here, neither with tc netem nor with the userspace
    bridge, or None when one of them works."""
    netem = netem_unusable_reason()
    if netem is None:
        return None
    bridge = bridge_unusable_reason()
    if bridge is None:
        return None
    return netem if netem == bridge else f"{netem}; {bridge}"


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    interface: str = ""  # its end of the veth pair to the bridge

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]

    def connection(self, host: str, port: int, timeout: float) -> http.client.HTTPConnection:
        """An HTTP connection to ``host:port`` as seen from inside this namespace (its own
        127.0.0.1 included)."""
        return _NamespaceHTTPConnection(self.namespace, host, port, timeout=timeout)


def impair(host: Host, netem: str) -> None:
    """Shape the host's egress with ``tc qdisc add dev IFACE root netem NETEM``
    (e.g. "delay 5ms loss 1% rate 100mbit")."""
    _run(*host.command("tc", "qdisc", "add", "dev", host.interface, "root", "netem", *netem.split()))


def socket_in(namespace: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that lives in ``namespace``. setns(2) moves only the calling thread, so a
    short-lived thread enters the namespace and makes the socket, which keeps that
    namespace for its whole life, whichever thread then uses it."""
    made: dict[str, Any] = {}

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/var/run/netns/{namespace}", "rb") as ns:
                if libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"cannot enter network namespace {namespace}: {os.strerror(err)}")
            made["socket"] = socket.socket(family, kind)
        except BaseException as exc:  # handed to the caller's thread
            made["error"] = exc

    thread = threading.Thread(target=make, name=f"setns-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["socket"]


class _NamespaceHTTPConnection(http.client.HTTPConnection):
    def __init__(self, namespace: str, host: str, port: int, *, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.namespace = namespace

    def connect(self) -> None:
        sock = socket_in(self.namespace)
        try:
            sock.settimeout(self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass
class Lan:
    """Hosts on one segment, and what shapes their links: "none", "netem" (tc on each
    host's interface) or "userspace" (``bridge``, the impaired bridge process)."""

    hosts: list[Host]
    hub: str
    shaping: Shaping
    bridge: BridgeProcess | None = None


@contextlib.contextmanager
def bridged_hosts(n: int, subnet: str, tag: str, impairment: Impairment | None = None) -> Iterator[list[Host]]:
    """n namespaces on one bridge, host i at f"{subnet}.{i + 1}/24", each host's link
    impaired by ``impairment`` (``lan`` says how)."""
    with lan(n, subnet, tag, impairment) as net:
        yield net.hosts


@contextlib.contextmanager
def lan(n: int, subnet: str, tag: str, impairment: Impairment | None = None, *,
        via: Literal["auto", "netem", "userspace"] = "auto") -> Iterator[Lan]:
    """n namespaces on one segment, host i at f"{subnet}.{i + 1}/24". With ``impairment``,
    ``via`` "auto" shapes with tc netem when the kernel has it and with the userspace
    bridge otherwise. The bridge process is stopped before the namespaces go."""
    shaping: Shaping = "none"
    if impairment is not None:
        shaping = "userspace" if via == "userspace" else "netem"
        if via == "auto" and (why := netem_unusable_reason()) is not None:
            shaping = "userspace"
            log.info("links impaired by the userspace bridge: %s", why)
    suffix = f"{tag}{os.getpid() % 100000}"
    hub = f"enjhub{suffix}"
    created: list[str] = []
    try:
        _run("ip", "netns", "add", hub)
        created.append(hub)
        if shaping != "userspace":
            _run("ip", "-n", hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            _run("ip", "-n", hub, "link", "set", "br0", "up")
        hosts = []
        with contextlib.ExitStack() as knobs_open:
            knobs = None  # a socket in the hub for the offload ioctls, before v{i} leaves it
            if shaping == "userspace":
                knobs = knobs_open.enter_context(socket_in(hub, socket.AF_INET, socket.SOCK_DGRAM))
            for i in range(n):
                ns = f"enjn{i}x{suffix}"
                _run("ip", "netns", "add", ns)
                created.append(ns)
                _run("ip", "-n", hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", f"v{i}")
                if knobs is not None:
                    disable_offloads(knobs, f"p{i}")
                    disable_offloads(knobs, f"v{i}")
                else:
                    _run("ip", "-n", hub, "link", "set", f"p{i}", "master", "br0")
                _run("ip", "-n", hub, "link", "set", f"p{i}", "up")
                _run("ip", "-n", hub, "link", "set", f"v{i}", "netns", ns)
                _run("ip", "-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", f"v{i}")
                _run("ip", "-n", ns, "link", "set", f"v{i}", "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                hosts.append(Host(ns, f"{subnet}.{i + 1}", f"v{i}"))
        if shaping == "netem":
            assert impairment is not None
            for h in hosts:
                impair(h, impairment.netem())
        if shaping == "userspace":
            assert impairment is not None
            with userspace_bridge(hub, [f"p{i}" for i in range(n)], impairment) as bridge:
                yield Lan(hosts, hub, shaping, bridge)
        else:
            yield Lan(hosts, hub, shaping)
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
