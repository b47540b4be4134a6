"""`nodectl init` / `secret` and the status table, without a daemon."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from node.cli import main, render_status
from node.config import load_config
from node.identity import ClusterKeys, NodeKey, parse_secret, read_secret_file


def _init(tmp: Path, name: str, *extra: str) -> Path:
    cfg = tmp / name / "node.toml"
    assert main(["init", "--config", str(cfg), "--data-dir", str(tmp / name / "data"), "--name", name, *extra]) == 0
    return cfg


def test_init_new_cluster_then_join_and_a_stranger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _init(tmp_path, "a", "--new-cluster", "--peer-port", "7500")
    printed = capsys.readouterr().out
    secret_line = next(line.strip() for line in printed.splitlines() if line.strip().startswith("enj1-"))
    cfg_a = load_config(a)
    assert cfg_a.network.peer_port == 7500
    assert read_secret_file(cfg_a.cluster.secret_file) == parse_secret(secret_line)
    assert stat.S_IMODE(os.stat(cfg_a.cluster.secret_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cfg_a.node.key_file).st_mode) == 0o600

    shared = tmp_path / "copied.txt"
    shared.write_text(f"\n  {secret_line}  \n")
    b = _init(tmp_path, "b", "--secret-file", str(shared), "--bootstrap", "127.0.0.1:7421")
    cfg_b = load_config(b)
    assert cfg_b.network.bootstrap == (("127.0.0.1", 7421),)
    assert "enj1-" not in capsys.readouterr().out  # a joining node does not print the secret

    c = _init(tmp_path, "c", "--new-cluster")
    capsys.readouterr()
    cfg_c = load_config(c)
    ca = {p: ClusterKeys.from_secret(read_secret_file(load_config(p).cluster.secret_file)).ca_pem for p in (a, b, c)}
    assert ca[a] == ca[b] != ca[c]
    ids = {NodeKey.load(x.node.key_file).node_id for x in (cfg_a, cfg_b, cfg_c)}
    assert len(ids) == 3

    assert main(["secret", "--config", str(a)]) == 0
    assert capsys.readouterr().out.strip() == secret_line


def test_init_refuses_overwrite_and_keeps_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _init(tmp_path, "n", "--new-cluster")
    key_before = NodeKey.load(load_config(cfg).node.key_file).node_id
    assert main(["init", "--config", str(cfg), "--new-cluster"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["init", "--config", str(cfg), "--data-dir", str(tmp_path / "n" / "data"),
                 "--new-cluster", "--force"]) == 0
    assert NodeKey.load(load_config(cfg).node.key_file).node_id == key_before


def test_init_secret_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    first = _init(tmp_path, "a", "--new-cluster")
    capsys.readouterr()
    main(["secret", "--config", str(first)])
    text = capsys.readouterr().out.strip()
    monkeypatch.setenv("ENJAMBRE_SECRET", text)
    second = _init(tmp_path, "b")
    assert read_secret_file(load_config(second).cluster.secret_file) == parse_secret(text)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--new-cluster"),
        (["--secret-file", "/nonexistent/secret"], "cannot read"),
        (["--bootstrap", "nope", "--new-cluster"], "--bootstrap"),
        (["--peer-port", "70000", "--new-cluster"], "peer_port"),
    ],
)
def test_init_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                        args: list[str], message: str) -> None:
    monkeypatch.delenv("ENJAMBRE_SECRET", raising=False)
    cfg = tmp_path / "node.toml"
    assert main(["init", "--config", str(cfg), "--data-dir", str(tmp_path / "d"), *args]) == 1
    assert message in capsys.readouterr().err
    assert not cfg.exists()


def test_init_bad_secret_file_content(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "s.txt"
    bad.write_text("enj1-not-really")
    assert main(["init", "--config", str(tmp_path / "node.toml"), "--secret-file", str(bad)]) == 1
    assert "copy it" in capsys.readouterr().err


def test_render_status_table() -> None:
    data = {
        "self": "a" * 64, "cluster": "c0ffee",
        "nodes": [
            {"id": "a" * 64, "name": "kitchen", "addresses": ["10.0.0.2"], "peer_port": 7420, "state": "ready",
             "device": "cpu", "memory_used": 2**30, "memory_allowed": 8 * 2**30, "memory_total": 16 * 2**30,
             "tflops": 0.5, "last_seen_s": 0.2},
            {"id": "b" * 64, "name": "garage", "addresses": ["10.0.0.3"], "peer_port": 7420, "state": "joining",
             "device": "NVIDIA H100", "memory_used": 0, "memory_allowed": 64 * 2**30, "memory_total": 80 * 2**30,
             "tflops": 400.0, "last_seen_s": 4.0},
        ],
    }
    text = render_status(data)
    lines = text.splitlines()
    assert lines[1].startswith("*") and "kitchen" in lines[1] and "aaaaaaaaaaaa" in lines[1]
    assert "garage" in lines[2] and "4s ago" in lines[2] and "NVIDIA H100" in lines[2]
    assert "2 nodes" in text and "72.0 GiB allowed of 96.0 GiB" in text and "400.50 TFLOPS" in text
