"""`nodectl init` / `secret` and the status table, without a daemon."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from node.cli import build_parser, main, render_status
from node.client import DEFAULT_API
from node.client import api_address as _api_address
from node.config import (
    DEFAULT_API_HOST,
    DEFAULT_API_PORT,
    DEFAULT_BEACON_PORT,
    DEFAULT_DHT_PORT,
    DEFAULT_LISTEN,
    DEFAULT_PEER_PORT,
    load_config,
)
from node.config_schema import keys, sections
from node.identity import NodeKey, parse_secret, read_secret_file
from node.system.logs import LEVELS


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
    # Same secret = same cluster (every cluster key is derived from it).
    secret = {p: read_secret_file(load_config(p).cluster.secret_file) for p in (a, b, c)}
    assert secret[a] == secret[b] != secret[c]
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
             "device": "cpu", "memory_used": 3 * 2**29, "rss": 5 * 2**30, "memory_allowed": 8 * 2**30,
             "memory_total": 16 * 2**30, "tflops": 0.5, "last_seen_s": 0.2, "loop_lag_ms": 3.2,
             "serving": [{"model": "c" * 64, "name": "m", "start": 0, "end": 4, "epoch": 1, "sessions": 0,
                          "memory": 2**30},
                         {"model": "d" * 64, "name": "n", "start": 0, "end": 2, "epoch": 1, "sessions": 0,
                          "memory": 2**29}]},
            {"id": "b" * 64, "name": "garage", "addresses": ["10.0.0.3"], "peer_port": 7420, "state": "joining",
             "device": "NVIDIA H100", "memory_used": 0, "memory_allowed": 64 * 2**30, "memory_total": 80 * 2**30,
             "tflops": 400.0, "last_seen_s": 4.0},
        ],
    }
    text = render_status(data)
    lines = text.splitlines()
    assert lines[1].startswith("*") and "kitchen" in lines[1] and "aaaaaaaaaaaa" in lines[1]
    assert "garage" in lines[2] and "4s ago" in lines[2] and "NVIDIA H100" in lines[2]
    assert "LAG" in lines[0] and "3 ms" in lines[1] and "?" in lines[2]  # garage's record is of an older build
    # used is what the loaded layers hold (1.5 GiB, under the 8 lent), not the process's 5 GiB
    assert "1.5 / 8.0 / 16.0" in lines[1] and "0.0 / 64.0 / 80.0" in lines[2]
    assert "2 nodes" in text and "72.0 GiB allowed of 96.0 GiB" in text and "400.50 TFLOPS" in text
    assert "clock" not in text


def test_render_status_strips_control_characters_and_warns_about_clocks() -> None:
    evil = "x\x1b[2J\x1b[Hpwned\nfake line"
    data = {"self": "a" * 64, "cluster": "c", "nodes": [
        {"id": "a" * 64, "name": evil, "addresses": ["10.0.0.2"], "peer_port": 7420, "state": "ready",
         "device": "cpu\r", "memory_used": 0, "memory_allowed": 0, "memory_total": 0, "tflops": 0.0,
         "last_seen_s": 0.0, "clock_offset_s": -75.0},
    ]}
    text = render_status(data)
    assert "\x1b" not in text and "\r" not in text
    assert len(text.splitlines()) == 5  # header, one node, blank, summary, the clock warning
    assert "75 s behind its peers" in text.splitlines()[-1]


def test_init_writes_a_commented_file_that_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _init(tmp_path, "n", "--new-cluster", "--listen", "192.168.1.20", "--bootstrap", "[fd00::2]:7421",
                "--max-memory", "2GiB", "--no-discovery")
    capsys.readouterr()
    text = cfg.read_text()
    document = tomllib.loads(text)
    data = tmp_path / "n" / "data"
    assert document == {
        "node": {"name": "n", "data_dir": str(data), "key_file": str(data / "node.key")},
        "cluster": {"secret_file": str(cfg.parent / "cluster.secret")},
        "network": {"listen": "192.168.1.20", "peer_port": DEFAULT_PEER_PORT, "dht_port": DEFAULT_DHT_PORT,
                    "bootstrap": ["[fd00::2]:7421"], "discovery": False},
        "api": {"host": DEFAULT_API_HOST, "port": DEFAULT_API_PORT},
        "resources": {"max_memory": "2GiB"},
        "dht": {}, "engine": {}, "swarm": {}, "log": {},
    }
    loaded = load_config(cfg)
    assert loaded.network.bootstrap == (("fd00::2", 7421),)
    assert loaded.resources.max_memory == 2 * 2**30
    # Self-explaining: every key of the schema is there, set or commented out under its doc.
    comments = " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    for section, cls in sections().items():
        assert f"\n[{section}]\n" in text
        for name, spec in keys(cls).items():
            assert f"\n{name} = " in text or f"\n# {name} = " in text, f"{section}.{name}"
            assert " ".join(spec.doc.split()) in comments, f"doc of {section}.{name}"
    assert f"\n# beacon_port = {DEFAULT_BEACON_PORT}\n" in text
    assert "\n# republish_interval = 10.0\n" in text
    assert "# Seconds between re-publishing this node's records" in text


def test_init_flag_defaults_are_the_schema_defaults() -> None:
    args = build_parser().parse_args(["init"])
    assert (args.listen, args.peer_port, args.dht_port, args.api_host, args.api_port) == (
        DEFAULT_LISTEN, DEFAULT_PEER_PORT, DEFAULT_DHT_PORT, DEFAULT_API_HOST, DEFAULT_API_PORT)
    assert DEFAULT_API == (DEFAULT_API_HOST, DEFAULT_API_PORT)
    serve = build_parser().parse_args(["serve", "--log-level", "debug"])
    assert serve.log_level == "debug"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-level", "loud"])
    assert set(LEVELS) == {"debug", "info", "warning", "error"}


@pytest.mark.parametrize(
    "host, expected",
    [
        ("10.0.0.5:9000", ("10.0.0.5", 9000)),
        ("http://10.0.0.5:9000", ("10.0.0.5", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("node-b.local", ("node-b.local", DEFAULT_API_PORT)),
    ],
)
def test_api_address_from_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str,
                               expected: tuple[str, int]) -> None:
    monkeypatch.delenv("ENJAMBRE_TOKEN", raising=False)
    args = build_parser().parse_args(["status", "--host", host, "--config", str(tmp_path / "none.toml")])
    assert _api_address(args) == (*expected, None)


def test_api_address_defaults_and_bad_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ENJAMBRE_HOST", raising=False)
    monkeypatch.delenv("ENJAMBRE_TOKEN", raising=False)
    args = build_parser().parse_args(["status", "--config", str(tmp_path / "none.toml")])
    assert _api_address(args) == (*DEFAULT_API, None)
    assert main(["status", "--host", "bad host!:80", "--config", str(tmp_path / "none.toml")]) == 1
    assert "bad daemon address" in capsys.readouterr().err


def test_status_table_brackets_ipv6() -> None:
    data = {"self": "", "cluster": "c", "nodes": [{"id": "a" * 64, "name": "v6", "addresses": ["fd00::2"],
                                                   "peer_port": 7420}]}
    assert "[fd00::2]:7420" in render_status(data)


def test_render_status_flags_claims_planners_do_not_believe() -> None:
    from node.cluster.directory import status_view

    liar = {"name": "mallory", "state": "ready", "memory_allowed": 2**40, "memory_total": 8 * 2**30,
            "tflops": 1000.0, "cpu_count": 2, "device_kind": "cpu", "ts": 100.0, "addresses": ["10.0.0.9"],
            "peer_port": 7420}
    view = status_view({"e" * 64: liar}, self_id="a" * 64, cluster_id="c", now=100.0)
    text = render_status(view)
    assert "warning: mallory claims 1000 TFLOPS" in text and "capped" in text
    assert "warning: mallory lends" in text
