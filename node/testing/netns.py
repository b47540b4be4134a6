"""Hosts in network namespaces for tests and benchmarks: a bridge in a private hub namespace plus N nodes.

Addresses exist only inside the namespaces the test made; the host's own
interfaces and routes are never touched. Everything is deleted on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]


@contextlib.contextmanager
def bridged_hosts(n: int, subnet: str, tag: str) -> Iterator[list[Host]]:
    """n namespaces on one bridge, host i at f"{subnet}.{i + 1}/24"."""
    suffix = f"{tag}{os.getpid() % 100000}"
    hub = f"enjhub{suffix}"
    created: list[str] = []
    try:
        _run("ip", "netns", "add", hub)
        created.append(hub)
        _run("ip", "-n", hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _run("ip", "-n", hub, "link", "set", "br0", "up")
        hosts = []
        for i in range(n):
            ns = f"enjn{i}x{suffix}"
            _run("ip", "netns", "add", ns)
            created.append(ns)
            _run("ip", "-n", hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", f"v{i}")
            _run("ip", "-n", hub, "link", "set", f"p{i}", "master", "br0")
            _run("ip", "-n", hub, "link", "set", f"p{i}", "up")
            _run("ip", "-n", hub, "link", "set", f"v{i}", "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", f"v{i}")
            _run("ip", "-n", ns, "link", "set", f"v{i}", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            hosts.append(Host(ns, f"{subnet}.{i + 1}"))
        yield hosts
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
