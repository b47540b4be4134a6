"""Node identity, the cluster secret, and the certificates derived from it.

A node is its Ed25519 key: the node id is the SHA-256 of the raw public key, so
two machines can never share an id (even when a home directory is copied, the
key is regenerated or both hold the same key and are then the same node).

The cluster secret is 32 random bytes shown as text. Every key material the
cluster shares (the CA key, the DHT and beacon sealing keys) is derived from it
with HKDF, so knowing the secret is membership: each node issues its own
certificate with the derived CA and checks every peer against the same CA.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
import ssl
import stat
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from node.system.files import atomic_write

SECRET_PREFIX = "enj1"
SECRET_BYTES = 32
_CHECKSUM_BYTES = 2
# A fixed validity window keeps the CA certificate byte-identical on every node.
_CA_NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
_CA_NOT_AFTER = dt.datetime(2124, 1, 1, tzinfo=dt.UTC)
_NODE_CERT_DAYS = 3650


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


def node_id_for(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()


def dht_id_for(public_key: bytes) -> bytes:
    return hashlib.sha256(public_key).digest()[:20]


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


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

    @cached_property
    def ca_name(self) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"enjambre cluster {self.cluster_id}")])

    @cached_property
    def ca_cert(self) -> x509.Certificate:
        public = self.ca_key.public_key()
        serial = int.from_bytes(self.derive("ca-serial", 16), "big") >> 1
        return (
            x509.CertificateBuilder()
            .subject_name(self.ca_name)
            .issuer_name(self.ca_name)
            .public_key(public)
            .serial_number(serial or 1)
            .not_valid_before(_CA_NOT_BEFORE)
            .not_valid_after(_CA_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.ca_key, algorithm=None)
        )

    @cached_property
    def ca_pem(self) -> str:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM).decode()


# --------------------------------------------------------------------------- certificates and TLS


def issue_certificate(cluster: ClusterKeys, key: NodeKey, name: str = "") -> x509.Certificate:
    """This node's certificate: its own key, its node id as subject, signed by the cluster CA."""
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, key.node_id)]
    if name:
        attrs.append(x509.NameAttribute(NameOID.PSEUDONYM, name[:64]))
    now = dt.datetime.now(dt.UTC)
    ca_public = cluster.ca_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(cluster.ca_name)
        .public_key(key.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=_NODE_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False)
        .sign(cluster.ca_key, algorithm=None)
    )


def _load_identity_into(ctx: ssl.SSLContext, cluster: ClusterKeys, key: NodeKey, name: str) -> None:
    cert = issue_certificate(cluster, key, name)
    # ssl can only load a certificate chain from files: write them to a private
    # temporary directory and remove them at once.
    with tempfile.TemporaryDirectory(prefix="enjambre-tls-") as tmp:
        cert_path = Path(tmp, "node.crt")
        key_path = Path(tmp, "node.key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.touch(mode=0o600)
        key_path.write_bytes(
            key.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ctx.load_cert_chain(str(cert_path), str(key_path))
    ctx.load_verify_locations(cadata=cluster.ca_pem)


def _base_context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_ssl_context(cluster: ClusterKeys, key: NodeKey, name: str = "") -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _load_identity_into(ctx, cluster, key, name)
    return ctx


def client_ssl_context(cluster: ClusterKeys, key: NodeKey, name: str = "") -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    # Peers are named by node id (read from the verified certificate), not by host name.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_identity_into(ctx, cluster, key, name)
    return ctx


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    node_id: str
    public_key: bytes
    name: str


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> PeerIdentity:
    """The peer's identity from its verified certificate (never from what it says in-band)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise IdentityError("the peer presented no certificate")
    return identity_from_certificate(x509.load_der_x509_certificate(der))


def identity_from_certificate(cert: x509.Certificate) -> PeerIdentity:
    public = cert.public_key()
    if not isinstance(public, Ed25519PublicKey):
        raise IdentityError("the peer's certificate does not hold an Ed25519 key")
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    node_id = node_id_for(raw)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns or cns[0].value != node_id:
        raise IdentityError("the peer's certificate names a node id that does not match its key")
    names = cert.subject.get_attributes_for_oid(NameOID.PSEUDONYM)
    name = str(names[0].value) if names else ""
    return PeerIdentity(node_id=node_id, public_key=raw, name=name)
