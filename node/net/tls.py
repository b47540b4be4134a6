"""TLS for peer streams: the cluster CA certificate, node certificates, SSL contexts, peer identity.

Every node builds the byte-identical CA certificate from the secret-derived CA key
(fixed validity window, derived serial, Ed25519's deterministic signatures), issues
its own certificate (its node key, its node id as subject) and checks every peer
against that CA: TLS 1.3 only, certificates required on both sides. The peer's node
id is computed from the verified certificate's key (``peer_identity``), never taken
from anything the peer says.
"""

from __future__ import annotations

import datetime as dt
import secrets
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from node.identity import ClusterKeys, IdentityError, NodeKey
from protocol.ids import node_id_for

__all__ = [
    "PeerIdentity",
    "ca_certificate",
    "ca_pem",
    "client_ssl_context",
    "identity_from_certificate",
    "issue_certificate",
    "peer_identity",
    "server_ssl_context",
]

# A fixed validity window keeps the CA certificate byte-identical on every node.
_CA_NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
_CA_NOT_AFTER = dt.datetime(2124, 1, 1, tzinfo=dt.UTC)


def _ca_name(cluster: ClusterKeys) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"enjambre cluster {cluster.cluster_id}")])


def ca_certificate(cluster: ClusterKeys) -> x509.Certificate:
    """The cluster CA certificate, the same bytes on every node of the cluster."""
    public = cluster.ca_key.public_key()
    serial = int.from_bytes(cluster.derive("ca-serial", 16), "big") >> 1
    name = _ca_name(cluster)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
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
        .sign(cluster.ca_key, algorithm=None)
    )


def ca_pem(cluster: ClusterKeys) -> str:
    return ca_certificate(cluster).public_bytes(serialization.Encoding.PEM).decode()




def issue_certificate(cluster: ClusterKeys, key: NodeKey) -> x509.Certificate:
    """This node's certificate: its own key, its node id as subject, signed by the cluster CA.

    Nothing else is in it: anyone who connects sees the certificate before any
    check, so the node's name travels only in the Hello, to members. The validity
    window is the CA's, not "now": a certificate issued while the clock ran ahead
    must not be refused once the clock is right again.
    """
    ca_public = cluster.ca_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key.node_id)]))
        .issuer_name(_ca_name(cluster))
        .public_key(key.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_CA_NOT_BEFORE)
        .not_valid_after(_CA_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False)
        .sign(cluster.ca_key, algorithm=None)
    )


def _load_identity_into(ctx: ssl.SSLContext, cluster: ClusterKeys, key: NodeKey) -> None:
    cert = issue_certificate(cluster, key)
    # ssl loads a certificate chain only from files. The key goes to disk encrypted
    # with a one-time password that never leaves this process, in a private
    # directory removed at once: its plain bytes are never on disk.
    password = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="enjambre-tls-") as tmp:
        cert_path = Path(tmp, "node.crt")
        key_path = Path(tmp, "node.key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.touch(mode=0o600)
        key_path.write_bytes(
            key.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password),
            )
        )
        ctx.load_cert_chain(str(cert_path), str(key_path), password=password)
    ctx.load_verify_locations(cadata=ca_pem(cluster))


def _base_context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_ssl_context(cluster: ClusterKeys, key: NodeKey) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _load_identity_into(ctx, cluster, key)
    return ctx


def client_ssl_context(cluster: ClusterKeys, key: NodeKey) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    # Peers are named by node id (read from the verified certificate), not by host name.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_identity_into(ctx, cluster, key)
    return ctx


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    node_id: str
    public_key: bytes


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
    return PeerIdentity(node_id=node_id, public_key=raw)
