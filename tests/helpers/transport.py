"""Helpers for the transport tests: clusters, transports, and a raw TLS peer.

Not a conftest.py (tests/conftest.py belongs to the coordinator); the test
modules import these names directly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from node.identity import ClusterKeys, NodeKey, generate_secret, parse_secret
from node.net.tls import client_ssl_context
from node.net.transport import Transport
from protocol.errors import ProtocolError
from protocol.framing import FrameDecoder, encode_frame
from protocol.messages import PROTOCOL_VERSION, Hello, Message, decode_message, encode_message

HOST = "127.0.0.1"


def new_cluster() -> ClusterKeys:
    return ClusterKeys.from_secret(parse_secret(generate_secret()))


@asynccontextmanager
async def running(cluster: ClusterKeys, name: str, *, listen: bool = True,
                  **kwargs: Any) -> AsyncIterator[Transport]:
    """A started Transport on 127.0.0.1 (port 0), always closed afterwards."""
    transport = Transport(NodeKey.generate(), cluster, name=name, software_version="test", **kwargs)
    try:
        if listen:
            await transport.start(HOST, 0)
        yield transport
    finally:
        await transport.close()


async def echo(conn: Any, body: Any) -> Any:
    return body


class RawPeer:
    """A TLS client that speaks frames by hand, to send what a real node never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: NodeKey) -> None:
        self.reader = reader
        self.writer = writer
        self.key = key
        self.decoder = FrameDecoder()

    @classmethod
    async def connect(cls, cluster: ClusterKeys, port: int, key: NodeKey | None = None) -> RawPeer:
        key = key or NodeKey.generate()
        reader, writer = await asyncio.open_connection(HOST, port, ssl=client_ssl_context(cluster, key))
        return cls(reader, writer, key)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, msg: Message) -> None:
        self.writer.write(encode_frame(encode_message(msg)))

    def hello(self, version: int = PROTOCOL_VERSION) -> None:
        self.send(Hello(version, self.key.node_id, "raw", "test"))

    async def recv(self, within: float = 5.0) -> Message | None:
        """The next message, or None at end of stream."""
        async with asyncio.timeout(within):
            while True:
                frame = self.decoder.next_frame()
                if frame is not None:
                    return decode_message(frame)
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, ssl.SSLError):
                    data = b""
                if not data:
                    return None
                self.decoder.receive_data(data)

    async def recv_until_closed(self, within: float = 5.0) -> list[Message]:
        out = []
        try:
            while (msg := await self.recv(within)) is not None:
                out.append(msg)
        except ProtocolError:
            pass
        return out

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def self_signed_context(key: NodeKey) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting a self-signed certificate for ``key``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key.node_id)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.private_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key.private_key, algorithm=None)
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = Path(tmp, "c.pem"), Path(tmp, "k.pem")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


def no_cert_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
