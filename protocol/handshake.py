"""The Hello decision: whether a peer's first message lets the connection go on.

Pure: the I/O side (node/net/connection.py) passes the Hello, the node id proved by
the peer's verified certificate, this node's id, the id the dialer expected (if any)
and the protocol version this node speaks, and gets back None (accepted) or a
:class:`HelloRejection`. The rejection carries the code and text sent to the peer
in an ``Error`` frame and the text for this node's own error, so both sides learn
what went wrong. Checks run in an order that tells the most useful thing first:
a version mismatch is reported even when the ids are fine.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.messages import Hello

__all__ = ["HelloRejection", "check_hello"]


@dataclass(frozen=True, slots=True)
class HelloRejection:
    code: str  # machine-readable, also sent to the peer
    message: str  # sent to the peer
    detail: str  # for this node's error and log (the caller adds the peer's address)

    @property
    def version_mismatch(self) -> bool:
        return self.code == "protocol_version"


def check_hello(
    hello: Hello,
    *,
    certified_id: str,
    own_id: str,
    expected_id: str | None,
    version: int,
) -> HelloRejection | None:
    """None if the peer may go on, else why not (see the module docstring)."""
    if hello.protocol_version != version:
        message = (
            f"protocol version mismatch: this node speaks version {version}, "
            f"the peer version {hello.protocol_version}; run the same enjambre release on all nodes"
        )
        return HelloRejection("protocol_version", message, message)
    if hello.node_id != certified_id:
        return HelloRejection(
            "identity_mismatch",
            "hello names another node than the certificate",
            "claims an id that its certificate does not prove",
        )
    if certified_id == own_id:
        return HelloRejection(
            "self_connection", "a node cannot connect to itself", "is this node itself"
        )
    if expected_id is not None and certified_id != expected_id:
        return HelloRejection(
            "wrong_node",
            "this is not the node the caller expected",
            f"is node {certified_id[:12]}, not the expected {expected_id[:12]}; "
            "the address may belong to another node now",
        )
    return None
