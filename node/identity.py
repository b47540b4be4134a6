"""Node identity and the cluster secret: the node's key, and the keys derived from the secret.

A node is its Ed25519 key: the node id is the SHA-256 of the raw public key, so
two machines can never share an id (even when a home directory is copied, the
key is regenerated or both hold the same key and are then the same node).

The cluster secret is 32 random bytes shown as text. Every key material the
cluster shares (the CA key, the DHT and beacon sealing keys) is derived from it
with HKDF, so knowing the secret is membership: each node issues its own
certificate with the derived CA and checks every peer against the same CA
(node/net/tls.py). The id rule itself is in protocol/ids.py.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from node.system.files import atomic_write
from protocol.ids import dht_id_for, node_id_for

SECRET_PREFIX = "enj1"
SECRET_BYTES = 32
_CHECKSUM_BYTES = 2


class IdentityError(Exception):
    """A key, secret or certificate problem the user can fix; the message says how."""


# --------------------------------------------------------------------------- secret


def _checksum(raw: bytes) -> bytes:
    return hashlib.sha256(b"enjambre-secret" + raw).digest()[:_CHECKSUM_BYTES]


def generate_secret() -> str:
    """A new cluster secret as text, e.g. ``enj1-abcd-efgh-...`` (with a typo check)."""
    return format_secret(secrets.token_bytes(SECRET_BYTES))


def format_secret(raw: bytes) -> str:
    if len(raw) != SECRET_BYTES:
        raise IdentityError(f"a cluster secret is {SECRET_BYTES} bytes, got {len(raw)}")
    text = base64.b32encode(raw + _checksum(raw)).decode().rstrip("=").lower()
    groups = [text[i : i + 5] for i in range(0, len(text), 5)]
    return "-".join([SECRET_PREFIX, *groups])


def parse_secret(text: str) -> bytes:
    """The 32 secret bytes from the text `generate_secret` printed (whitespace ignored)."""
    compact = "".join(text.split()).lower()
    if not compact.startswith(SECRET_PREFIX + "-"):
        raise IdentityError(
            f"this is not an enjambre cluster secret (it should start with '{SECRET_PREFIX}-'); "
            "copy it exactly as `nodectl init --new-cluster` or `nodectl secret` printed it"
        )
    body = compact[len(SECRET_PREFIX) + 1 :].replace("-", "").upper()
    try:
        decoded = base64.b32decode(body + "=" * (-len(body) % 8))
    except (ValueError, base64.binascii.Error) as exc:  # type: ignore[attr-defined]
        raise IdentityError(f"the cluster secret is malformed ({exc}); copy it again") from None
    if len(decoded) != SECRET_BYTES + _CHECKSUM_BYTES:
        raise IdentityError("the cluster secret has the wrong length; copy it again, whole")
    raw, check = decoded[:SECRET_BYTES], decoded[SECRET_BYTES:]
    if _checksum(raw) != check:
        raise IdentityError("the cluster secret has a typo (its checksum does not match); copy it again")
    return raw


def _check_private_mode(path: Path, what: str) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{what} {path} can be read by other users (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {path}`"
        )


def read_secret_file(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise IdentityError(
            f"cluster secret file {path} does not exist; create it with `nodectl init --new-cluster`, "
            "or copy the secret from another node (`nodectl secret` there) and pass --secret-file"
        )
    _check_private_mode(path, "cluster secret file")
    return parse_secret(path.read_text(encoding="utf-8", errors="replace"))


def write_secret_file(path: Path, text: str) -> None:
    parse_secret(text)  # never store something that will not load
    atomic_write(path, text.strip() + "\n", mode=0o600)


# --------------------------------------------------------------------------- node key


class NodeKey:
    """This node's Ed25519 key and the ids derived from it."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self.private_key = private_key
        self.public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.node_id = node_id_for(self.public_bytes)
        self.dht_id = dht_id_for(self.public_bytes)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> NodeKey:
        path = Path(path)
        if not path.is_file():
            raise IdentityError(f"node key {path} does not exist; run `nodectl init` to create it")
        _check_private_mode(path, "node key")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"node key {path} is not a readable PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"node key {path} is not an Ed25519 key")
        return cls(key)

    def save(self, path: Path) -> None:
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write(path, pem, mode=0o600)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


# --------------------------------------------------------------------------- cluster keys


class ClusterKeys:
    """Everything derived from the cluster secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != SECRET_BYTES:
            raise IdentityError(f"a cluster secret is {SECRET_BYTES} bytes, got {len(secret)}")
        self._secret = secret
        self.cluster_id = self.derive("cluster-id", 8).hex()
        self.dht_key = self.derive("dht-seal")
        self.beacon_key = self.derive("beacon-seal")
        self.ca_key = Ed25519PrivateKey.from_private_bytes(self.derive("ca-key"))

    @classmethod
    def from_secret(cls, secret: bytes) -> ClusterKeys:
        return cls(secret)

    def derive(self, label: str, length: int = 32) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=length, salt=None, info=b"enjambre/" + label.encode()
        ).derive(self._secret)
