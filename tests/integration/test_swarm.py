"""Models between real daemons: import once, replicate byte for byte, survive bad pieces and dead nodes."""

from __future__ import annotations

import asyncio
import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.identity import NodeKey
from node.net.errors import RemoteError
from node.net.transport import Transport
from node.testing.localcluster import LocalCluster, LocalNode
from node.testing.tinymodel import make_tiny_model
from protocol.manifest import parse_manifest
from tests.helpers.attacker import cluster_keys, metric

pytestmark = pytest.mark.slow


def nodectl(node: LocalNode, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ENJAMBRE_CONFIG": str(node.config)})
    if check:
        assert out.returncode == 0, out.stderr + out.stdout
    return out


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return sorted(match) == names and not mismatch and not errors


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cache = tmp_path_factory.mktemp("xdg-cache")
    c = LocalCluster(tmp_path_factory.mktemp("swarm"),
                     env={"XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2"})
    try:
        c.launch(3)
        c.wait_converged(timeout=60)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model", layers=4, hidden=128,
                           intermediate=256, vocab_size=1024, shards=2)


def test_import_once_then_every_node_gets_a_byte_identical_copy(trio: LocalCluster, tiny: Path,
                                                                 tmp_path: Path) -> None:
    seed, second, third = trio.nodes
    out = nodectl(seed, "pull", str(tiny), "--piece-size", "16KiB")
    assert "tiny-model:latest" in out.stdout and "ready" in out.stdout
    for node, dest in ((second, tmp_path / "b"), (third, tmp_path / "c")):
        time.sleep(1.0)  # the holders' records spread
        out = nodectl(node, "pull", "tiny-model", "--export", str(dest))
        assert same_files(tiny, dest), out.stdout
    listing = json.loads(nodectl(seed, "list", "--json").stdout)
    (entry,) = [m for m in listing["models"] if m["name"] == "tiny-model:latest"]
    assert entry["copies"] == 3 and entry["architecture"] == "LlamaForCausalLM" and entry["local_share"] == 1.0
    assert "tiny-model:latest" in nodectl(third, "list").stdout
    # The last node fetched from both that held it: pieces came from more than the seed.
    assert metric(second, "enjambre_swarm_pieces_served_total") > 0


def test_requests_for_what_a_node_does_not_hold_are_refused(trio: LocalCluster, tiny: Path) -> None:
    seed = trio.nodes[0]
    model_id = json.loads(nodectl(seed, "list", "--json").stdout)["models"][0]["digest"]

    async def ask() -> None:
        keys = cluster_keys(trio)
        transport = Transport(NodeKey.generate(), keys, name="asker", software_version="test")
        try:
            conn = await transport.connect("127.0.0.1", int(seed.runtime["peer_port"]), expect_node_id=seed.node_id)
            for method, body, code in [
                ("swarm.manifest", {"id": "0" * 64}, "unknown_model"),
                ("swarm.piece", {"id": "0" * 64, "index": 0}, "unknown_model"),
                ("swarm.piece", {"id": model_id, "index": 10**9}, "no_such_piece"),
                ("swarm.piece", {"id": model_id, "index": "../../cluster.secret"}, "no_such_piece"),
                ("swarm.piece", {"id": "../x", "index": 0}, "bad_request"),
            ]:
                with pytest.raises(RemoteError) as info:
                    await conn.request(method, body, timeout=10)
                assert info.value.code == code, (method, body)
            assert len(await conn.request("swarm.piece", {"id": model_id, "index": 0}, timeout=10)) > 0
        finally:
            await transport.close()

    asyncio.run(ask())


def test_a_piece_damaged_on_disk_is_not_served_and_is_fetched_again(trio: LocalCluster, tiny: Path,
                                                                     tmp_path: Path) -> None:
    seed, second, _ = trio.nodes
    (manifest_file,) = [p for p in (seed.data_dir / "models").glob("*.json") if len(p.stem) == 64]
    manifest = parse_manifest(manifest_file.read_bytes())
    piece = manifest.pieces[manifest.num_pieces // 2]
    victim = seed.data_dir / "pieces" / piece.digest[:2] / piece.digest
    victim.write_bytes(b"rot" + victim.read_bytes()[3:])

    async def ask() -> None:
        transport = Transport(NodeKey.generate(), cluster_keys(trio), name="asker", software_version="test")
        try:
            conn = await transport.connect("127.0.0.1", int(seed.runtime["peer_port"]), expect_node_id=seed.node_id)
            with pytest.raises(RemoteError) as info:
                await conn.request("swarm.piece", {"id": manifest.model_id, "index": piece.index}, timeout=10)
            assert info.value.code == "not_held"  # never served
        finally:
            await transport.close()

    asyncio.run(ask())
    deadline = time.monotonic() + 20  # the seed deleted it and fetched it again from the others
    while not (victim.exists() and victim.read_bytes()[:3] != b"rot") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert victim.exists() and victim.read_bytes()[:3] != b"rot"
    nodectl(second, "rm", "tiny-model")
    nodectl(second, "pull", "tiny-model", "--export", str(tmp_path / "again"))
    assert same_files(tiny, tmp_path / "again")


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A seed, a holder and a fetcher that upload slowly (1 MB/s), so a transfer can be interrupted."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    c = LocalCluster(tmp_path_factory.mktemp("slow"), env={"XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1",
                                                            "ENJAMBRE_BENCH_SECONDS": "0.2"})
    try:
        for _ in range(3):
            node = c.add_node(config={"swarm": {"max_upload_rate": "1MB"}})
            c.start(node)
        c.wait_converged(timeout=60)
        yield c
    finally:
        c.close()


def test_a_holder_killed_mid_transfer_leaves_the_others_to_finish(slow: LocalCluster, tiny: Path,
                                                                  tmp_path: Path) -> None:
    seed, holder, fetcher = slow.nodes
    nodectl(seed, "pull", str(tiny), "--piece-size", "16KiB")
    time.sleep(1.0)
    nodectl(holder, "pull", "tiny-model")
    time.sleep(1.5)  # both records out
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "pull", "tiny-model", "--json"],
                            env={**os.environ, "ENJAMBRE_CONFIG": str(fetcher.config)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    slow.stop(holder, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err + out
    nodectl(fetcher, "pull", "tiny-model", "--export", str(tmp_path / "copy"))
    assert same_files(tiny, tmp_path / "copy")


def test_a_fetch_killed_with_its_daemon_resumes_without_fetching_a_piece_twice(slow: LocalCluster, tiny: Path,
                                                                                tmp_path: Path) -> None:
    seed, _, fetcher = slow.nodes  # the holder was killed by the test above
    nodectl(fetcher, "rm", "tiny-model")
    time.sleep(1.5)
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "pull", "tiny-model", "--json"],
                            env={**os.environ, "ENJAMBRE_CONFIG": str(fetcher.config)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    slow.stop(fetcher, signal.SIGKILL)
    proc.communicate(timeout=30)
    kept = len(list((fetcher.data_dir / "pieces").glob("*/*")))
    total = json.loads(nodectl(seed, "list", "--json").stdout)["models"][0]
    slow.start(fetcher)
    nodectl(fetcher, "pull", "tiny-model", "--export", str(tmp_path / "copy"))
    assert same_files(tiny, tmp_path / "copy")
    fetched = metric(fetcher, "enjambre_swarm_pieces_fetched_total")
    assert 0 < kept and 0 < fetched
    stored = len(list((fetcher.data_dir / "pieces").glob("*/*")))
    assert fetched == stored - kept, (fetched, stored, kept, total["size"])


def test_pull_from_the_hub_through_hf_endpoint(tmp_path: Path, shared_cache: Path) -> None:
    """hf:org/repo with huggingface_hub, against a stand-in hub on 127.0.0.1 (HF_ENDPOINT)."""
    from tests.helpers.fakehub import FakeHub

    model = make_tiny_model(tmp_path / "upstream", arch="qwen2", layers=2)
    with FakeHub(model, "org/tiny") as hub, LocalCluster(tmp_path / "c", env={
        "XDG_CACHE_HOME": str(shared_cache), "PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2",
        "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
    }) as cluster:
        (node,) = cluster.launch(1)
        out = nodectl(node, "pull", "hf:org/tiny", "--export", str(tmp_path / "copy"))
        assert "tiny:latest" in out.stdout
        assert same_files(model, tmp_path / "copy")
        assert any("/api/models/org/tiny" in r for r in hub.requests)
        bad = nodectl(node, "pull", "hf:org/missing", check=False)
        assert bad.returncode == 1 and "cannot download org/missing" in bad.stderr
