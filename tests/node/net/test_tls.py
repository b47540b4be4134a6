"""The cluster CA, node certificates and TLS contexts."""

from __future__ import annotations

import ssl

from cryptography.hazmat.primitives import serialization

from node.identity import ClusterKeys, NodeKey, generate_secret, parse_secret
from node.net.tls import (
    ca_certificate,
    ca_pem,
    client_ssl_context,
    identity_from_certificate,
    issue_certificate,
    server_ssl_context,
)


def test_ca_is_identical_from_the_same_secret_and_differs_otherwise() -> None:
    raw = parse_secret(generate_secret())
    a, b = ClusterKeys.from_secret(raw), ClusterKeys.from_secret(raw)
    assert ca_pem(a) == ca_pem(b) and a.dht_key == b.dht_key and a.cluster_id == b.cluster_id
    other = ClusterKeys.from_secret(parse_secret(generate_secret()))
    assert ca_pem(other) != ca_pem(a) and other.dht_key != a.dht_key
    assert a.dht_key != a.beacon_key


def test_certificate_binds_node_id_and_nothing_else() -> None:
    cluster = ClusterKeys.from_secret(parse_secret(generate_secret()))
    key = NodeKey.generate()
    cert = issue_certificate(cluster, key)
    cert.verify_directly_issued_by(ca_certificate(cluster))
    peer = identity_from_certificate(cert)
    assert peer.node_id == key.node_id
    # Nothing but the id: the certificate is shown to anyone who connects.
    assert len(cert.subject) == 1
    assert cert.not_valid_before_utc == ca_certificate(cluster).not_valid_before_utc
    assert peer.public_key == key.public_bytes
    raw = cert.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw == key.public_bytes


def test_tls_contexts_are_tls13_mutual() -> None:
    cluster = ClusterKeys.from_secret(parse_secret(generate_secret()))
    key = NodeKey.generate()
    for ctx in (server_ssl_context(cluster, key), client_ssl_context(cluster, key)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
