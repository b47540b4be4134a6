"""systemd's sd_notify protocol, without libsystemd.

Owns ``notify``: send ``READY=1``, ``STOPPING=1``, ``STATUS=...``, ``WATCHDOG=1`` to the
service manager over the unix datagram socket named by ``$NOTIFY_SOCKET`` (a leading
``@`` means Linux's abstract namespace). Outside systemd (no ``$NOTIFY_SOCKET``) it does
nothing, so the daemon can call it unconditionally.
"""

from __future__ import annotations

import os
import socket

import structlog

__all__ = ["notify", "watchdog_interval"]

log = structlog.get_logger(__name__)


def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        # Abstract namespace: the name starts with a NUL byte instead of "@".
        return b"\0" + value[1:].encode()
    return value


def notify(state: str, *, socket_path: str | None = None) -> bool:
    """Send ``state`` (one or more ``KEY=VALUE`` lines) to systemd.

    Returns True when the datagram was sent, False when there is no service manager to
    tell (``$NOTIFY_SOCKET`` unset) or sending failed: a status message must never take
    the daemon down, so failures are logged, not raised.
    """
    target = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if not hasattr(socket, "AF_UNIX"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(_address(target))
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning(
            "sd_notify failed", socket=target, state=state.split("\n", 1)[0], error=str(exc)
        )
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings systemd expects, or None when disabled.

    Half of ``$WATCHDOG_USEC`` (the usual margin), and only when ``$WATCHDOG_PID`` is
    unset or names this process.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2 / 1_000_000 if value > 0 else None
