"""Node keys, the cluster secret text form, derived CA and certificates."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from node.identity import (
    ClusterKeys,
    IdentityError,
    NodeKey,
    client_ssl_context,
    generate_secret,
    identity_from_certificate,
    issue_certificate,
    node_id_for,
    parse_secret,
    read_secret_file,
    server_ssl_context,
    verify_signature,
    write_secret_file,
)


def test_secret_round_trip_ignores_whitespace() -> None:
    text = generate_secret()
    raw = parse_secret(text)
    assert len(raw) == 32
    assert parse_secret(f"  {text.upper()}\n") == raw
    assert generate_secret() != text


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("hunter2", "should start with"),
        ("enj1-aaaa", "wrong length"),
        ("enj1-!!!!", "malformed"),
    ],
)
def test_bad_secret_texts_are_explained(bad: str, reason: str) -> None:
    with pytest.raises(IdentityError, match=reason):
        parse_secret(bad)


def test_secret_typo_is_caught_by_checksum() -> None:
    text = generate_secret()
    i = len(text) - 3
    flipped = text[:i] + ("a" if text[i] != "a" else "b") + text[i + 1 :]
    with pytest.raises(IdentityError, match="typo"):
        parse_secret(flipped)


def test_secret_file_mode_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    text = generate_secret()
    write_secret_file(path, text)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_secret_file(path) == parse_secret(text)
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        read_secret_file(path)
    with pytest.raises(IdentityError, match="does not exist"):
        read_secret_file(tmp_path / "missing")


def test_node_key_save_load_and_id(tmp_path: Path) -> None:
    key = NodeKey.generate()
    path = tmp_path / "node.key"
    key.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = NodeKey.load(path)
    assert again.node_id == key.node_id == node_id_for(key.public_bytes)
    assert len(key.node_id) == 64 and len(key.dht_id) == 20
    assert NodeKey.generate().node_id != key.node_id
    sig = key.sign(b"data")
    assert verify_signature(key.public_bytes, sig, b"data")
    assert not verify_signature(key.public_bytes, sig, b"other")
    assert not verify_signature(b"short", sig, b"data")


def test_node_key_errors(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="nodectl init"):
        NodeKey.load(tmp_path / "nope.key")
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    bad.chmod(0o600)
    with pytest.raises(IdentityError, match="PEM"):
        NodeKey.load(bad)
    key = NodeKey.generate()
    key.save(tmp_path / "open.key")
    (tmp_path / "open.key").chmod(0o640)
    with pytest.raises(IdentityError, match="chmod 600"):
        NodeKey.load(tmp_path / "open.key")


def test_ca_is_identical_from_the_same_secret_and_differs_otherwise() -> None:
    raw = parse_secret(generate_secret())
    a, b = ClusterKeys.from_secret(raw), ClusterKeys.from_secret(raw)
    assert a.ca_pem == b.ca_pem and a.dht_key == b.dht_key and a.cluster_id == b.cluster_id
    other = ClusterKeys.from_secret(parse_secret(generate_secret()))
    assert other.ca_pem != a.ca_pem and other.dht_key != a.dht_key
    assert a.dht_key != a.beacon_key


def test_certificate_binds_node_id_and_name() -> None:
    cluster = ClusterKeys.from_secret(parse_secret(generate_secret()))
    key = NodeKey.generate()
    cert = issue_certificate(cluster, key, "kitchen")
    cert.verify_directly_issued_by(cluster.ca_cert)
    peer = identity_from_certificate(cert)
    assert peer.node_id == key.node_id and peer.name == "kitchen"
    assert peer.public_key == key.public_bytes
    raw = cert.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw == key.public_bytes


def test_tls_contexts_are_tls13_mutual() -> None:
    cluster = ClusterKeys.from_secret(parse_secret(generate_secret()))
    key = NodeKey.generate()
    for ctx in (server_ssl_context(cluster, key), client_ssl_context(cluster, key)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
