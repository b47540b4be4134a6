"""Node keys, the cluster secret text form, derived CA and certificates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from node.identity import (
    IdentityError,
    NodeKey,
    generate_secret,
    parse_secret,
    read_secret_file,
    write_secret_file,
)
from protocol.ids import node_id_for


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
    public = Ed25519PublicKey.from_public_bytes(key.public_bytes)
    public.verify(sig, b"data")
    with pytest.raises(InvalidSignature):
        public.verify(sig, b"other")


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
