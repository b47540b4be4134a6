"""Distributed generation between real daemons: a model split over nodes answers exactly
as the engine in one process does, a node killed mid-generation is replaced without
breaking the stream, bad requests get clear errors. (A model that fits on one node runs
there: tests/integration/faces/test_ollama_api.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.engine import (
    PartitionSpec,
    SamplingParams,
    WeightSource,
    generate,
    load_chain,
    load_config,
)
from node.engine.tokenizer import Tokenizer
from node.identity import NodeKey
from node.net.errors import RemoteError
from node.net.transport import Transport
from node.testing.localcluster import LocalCluster, LocalNode
from node.testing.plans import lend_for_split
from node.testing.tinymodel import make_tiny_model
from tests.helpers.attacker import cluster_keys, metric

pytestmark = pytest.mark.slow

CONTEXT, SLOTS, CHUNK = 256, 4, 32
ENGINE = {"max_context": CONTEXT, "max_sessions": SLOTS, "prefill_chunk": CHUNK, "queue": 2,
          "step_timeout": 20.0, "compute_dtype": "float32"}
ENV = {"PYTHONUNBUFFERED": "1", "ENJAMBRE_BENCH_SECONDS": "0.2"}


def nodectl(node: LocalNode, *args: str, check: bool = True, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "ENJAMBRE_CONFIG": str(node.config)})
    if check:
        assert out.returncode == 0, out.stderr + out.stdout
    return out


def post(node: LocalNode, path: str, body: Any, *, timeout: float = 300) -> tuple[int, list[dict[str, Any]]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{node.api}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    except urllib.error.HTTPError as exc:
        return exc.code, [json.loads(exc.read())]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "pipe-model", layers=6, hidden=64,
                           intermediate=128, vocab_size=512)


@pytest.fixture(scope="module")
def lend(tiny: Path) -> int:
    """Memory per node such that only three nodes together hold the model."""
    return lend_for_split(tiny, 3, context=CONTEXT, slots=SLOTS, prefill_chunk=CHUNK)


def reference(tiny: Path, prompt_ids: list[int], n: int, penalty: float = 1.1) -> list[int]:
    """Greedy tokens of the single-process engine (whole model) for the same prompt, with
    Ollama's default repeat_penalty (1.1) unless told."""
    cfg = load_config(tiny)
    chain = load_chain(WeightSource.from_dir(tiny), cfg, [PartitionSpec.whole(cfg)], dtype="float32",
                       max_context=CONTEXT, prefill_chunk=CHUNK)
    tok = Tokenizer.from_model_dir(tiny)
    sampling = SamplingParams(repetition_penalty=penalty, stop_token_ids=tok.stop_token_ids)
    return [t for t, _ in generate(chain, prompt_ids, sampling, n, block=0)]


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory, tiny: Path, lend: int) -> Iterator[LocalCluster]:
    """Four nodes that each lend a third of what the model needs (three are planned, one spare)."""
    c = LocalCluster(tmp_path_factory.mktemp("pipe"), env=ENV)
    try:
        for _ in range(4):
            node = c.add_node(config={"resources": {"max_memory": lend}, "engine": ENGINE})
            c.start(node)
        c.wait_converged(timeout=60)
        nodectl(c.nodes[0], "pull", str(tiny), "--piece-size", "16KiB")
        time.sleep(1.0)
        yield c
    finally:
        c.close()


def chat_tokens(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": text}])


def test_split_over_three_nodes_answers_as_the_engine_does(split: LocalCluster, tiny: Path) -> None:
    driver = split.nodes[1]
    lines = [json.loads(x) for x in nodectl(driver, "load", "pipe-model", "--json").stdout.splitlines()]
    done = lines[-1]
    assert done["status"] == "success", lines
    assert len(done["plan"]) == 3 and done["plan"][0]["start"] == 0
    assert done["plan"][-1]["end"] == 6
    tok = Tokenizer.from_model_dir(tiny)
    status, out = post(driver, "/api/chat", {
        "model": "pipe-model", "messages": [{"role": "user", "content": "hola"}],
        "options": {"temperature": 0, "num_predict": 24}, "stream": False})
    assert status == 200, out
    (final,) = out
    want = reference(tiny, chat_tokens(tok, "hola"), 24)
    assert final["message"]["content"] == tok.decode(want)
    assert final["eval_count"] == len(want) and final["done"] is True
    assert final["prompt_eval_count"] == len(chat_tokens(tok, "hola"))
    assert len(set(final["nodes"])) == 3
    split.wait_until(lambda: nodectl(driver, "status").stdout.count("layers [") == 3, 30,
                     "status listing the three stages")
    # Every node measures its round trips to the others and publishes them for the planner.
    split.wait_until(lambda: all(len(n.get("rtt_ms") or {}) == 3 for n in split.status(driver)["nodes"]), 30,
                     "round trips in every record")
    # The driver probed the others' speed before planning (node/cluster/speed.py): honest
    # daemons of one machine, measured and believed.
    others = [n for n in split.status(driver)["nodes"] if not n["self"]]
    assert others and all(n.get("measured_tflops", 0) > 0 and not n.get("doubtful") for n in others), [
        (n.get("name"), n.get("tflops"), n.get("measured_tflops"), n.get("doubtful")) for n in others]
    ps = json.loads(nodectl(driver, "ps", "--json").stdout)
    (entry,) = ps["models"]
    assert [s["end"] - s["start"] for s in entry["plan"]] and sum(
        s["end"] - s["start"] for s in entry["plan"]) == 6


def test_streamed_generate_matches_and_ends_with_ollama_counters(split: LocalCluster, tiny: Path) -> None:
    driver = split.nodes[0]
    status, lines = post(driver, "/api/generate", {
        "model": "pipe-model", "prompt": "el perro", "raw": True, "options": {"temperature": 0, "num_predict": 12}})
    assert status == 200, lines
    *pieces, final = lines
    tok = Tokenizer.from_model_dir(tiny)
    want = reference(tiny, tok.encode("el perro"), 12)
    assert "".join(p["response"] for p in pieces) == tok.decode(want)
    assert all(p["done"] is False for p in pieces)
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration"):
        assert isinstance(final[key], int), key
    assert final["done"] is True and final["done_reason"] in ("length", "stop")


def test_bad_requests_get_clear_errors(split: LocalCluster) -> None:
    node = split.nodes[0]
    status, (body,) = post(node, "/api/chat", {"model": "no-such-model", "messages": [{"role": "user",
                                                                                      "content": "x"}]})
    assert status == 404 and "not found" in body["error"]
    status, (body,) = post(node, "/api/generate", b"{not json")
    assert status == 400 and "JSON" in body["error"]
    status, (body,) = post(node, "/api/generate", {"model": "pipe-model", "prompt": 5})
    assert status == 400 and "prompt" in body["error"]
    status, (body,) = post(node, "/api/generate", {"model": "pipe-model", "prompt": "x",
                                                   "options": {"temperature": "hot"}})
    assert status == 400 and "temperature" in body["error"]
    status, (body,) = post(node, "/api/generate", {"model": "pipe-model", "prompt": "a " * 400, "raw": True})
    assert status == 400 and "context" in body["error"]


def test_queue_full_is_503_and_concurrent_streams_are_correct(split: LocalCluster, tiny: Path) -> None:
    node = split.nodes[2]
    tok = Tokenizer.from_model_dir(tiny)
    prompts = ["uno", "dos dos", "tres tres tres", "cuatro"]
    results: dict[str, Any] = {}

    def one(p: str, n: int) -> None:
        results[p] = post(node, "/api/generate", {"model": "pipe-model", "prompt": p, "raw": True,
                                                  "options": {"temperature": 0, "num_predict": n}})

    threads = [threading.Thread(target=one, args=(p, 40)) for p in prompts]
    for t in threads:
        t.start()
    time.sleep(1.5)
    # 4 running and 2 waiting (engine.queue = 2): more are refused at once.
    extra = [threading.Thread(target=one, args=(f"extra {i}", 4)) for i in range(4)]
    for t in extra:
        t.start()
    for t in threads + extra:
        t.join(timeout=300)
    for p in prompts:
        status, lines = results[p]
        assert status == 200, lines
        text = "".join(x.get("response", "") for x in lines)
        assert text == tok.decode(reference(tiny, tok.encode(p), 40)), p
    refused = [results[f"extra {i}"] for i in range(4) if results[f"extra {i}"][0] == 503]
    assert refused and "waiting" in refused[0][1][0]["error"]


def test_client_disconnect_frees_the_caches_on_every_node(split: LocalCluster) -> None:
    driver = split.nodes[3]
    req = urllib.request.Request(f"http://{driver.api}/api/generate", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "pipe-model", "prompt": "adios", "raw": True,
                                                  "options": {"temperature": 0, "num_predict": 200}}).encode())
    resp = urllib.request.urlopen(req, timeout=300)
    for _ in range(3):
        assert json.loads(resp.readline())["done"] is False
    held = [metric(n, "enjambre_pipeline_sessions") for n in split.nodes]
    assert sum(held) == 3  # one session on each stage of the plan
    resp.close()  # the client goes away mid-stream
    split.wait_until(lambda: all(metric(n, "enjambre_pipeline_sessions") == 0 for n in split.nodes), 30,
                     "every stage freeing the session")
    assert metric(driver, "enjambre_pipeline_driven_sessions") == 0


def test_a_member_sending_bad_steps_or_lying_plans_is_refused(split: LocalCluster) -> None:
    """An insider (it holds the secret) gets named refusals, and a plan that claims a
    range needs 1 byte cannot make a node load more than it lends."""
    target = split.nodes[0]
    model_id = json.loads(nodectl(split.nodes[1], "ps", "--json").stdout)["models"][0]["digest"]

    async def attack() -> list[str]:
        transport = Transport(NodeKey.generate(), cluster_keys(split), name="insider", software_version="test")
        codes = []
        try:
            conn = await transport.connect("127.0.0.1", int(target.runtime["peer_port"]),
                                           expect_node_id=target.node_id)
            lying = {"stages": [{"node_id": target.node_id, "start": 0, "end": 6, "memory": 1}]}
            bodies = [
                ("pipe.step", {"model": model_id, "session": "x"}),
                ("pipe.step", {"model": "ab" * 32, "session": "00ff00ff00ff", "kind": "decode"}),
                ("pipe.load", {"model": model_id, "epoch": int(time.time() * 1000) << 10, "plan": lying, "index": 0, "max_context": CONTEXT,
                               "slots": SLOTS, "prefill_chunk": CHUNK, "dtype": "float32"}),
                ("pipe.load", {"model": model_id, "epoch": 1, "plan": {"stages": []}, "index": 0}),
            ]
            for method, body in bodies:
                with pytest.raises(RemoteError) as info:
                    await conn.request(method, body, timeout=120)
                codes.append(f"{info.value.code}: {info.value.message}")
        finally:
            await transport.close()
        return codes

    codes = asyncio.run(attack())
    assert codes[0].startswith(("bad_step", "not_loaded", "not_a_driver")), codes
    assert codes[1].startswith("not_loaded"), codes
    assert codes[2].startswith("out_of_memory") and "this node lends" in codes[2], codes
    assert codes[3].startswith("bad_plan"), codes
    # The refused load is in the log of the node that refused it, once, with its cause.
    refused = [line for line in target.log_path.read_text().splitlines() if '"stage_load_failed"' in line]
    assert len(refused) == 1 and "out_of_memory" in refused[0] and "this node lends" in refused[0]


def test_an_insider_cannot_drive_a_stage_it_does_not_lease_nor_take_every_slot(split: LocalCluster,
                                                                              tiny: Path) -> None:
    """Steps reach a stage only from a driver leasing it (the head) or from the plan's previous
    stage (the others): an insider's NaN rows sent straight to a middle stage are refused, as
    is a load from a far future epoch; leasing the head gets it every slot but the one a user's
    stream through another node holds, and that stream goes on unchanged."""
    driver = split.nodes[1]
    entry = json.loads(nodectl(driver, "ps", "--json").stdout)["models"][0]
    model_id, epoch, plan = entry["digest"], int(entry["epoch"]), entry["plan"]
    by_id = {n.node_id: n for n in split.nodes}
    head, middle = by_id[plan[0]["node_id"]], by_id[plan[1]["node_id"]]
    tok = Tokenizer.from_model_dir(tiny)
    user: dict[str, Any] = {}

    def stream() -> None:
        user["out"] = post(driver, "/api/generate", {"model": "pipe-model", "prompt": "el gato", "raw": True,
                                                     "options": {"temperature": 0, "num_predict": 30}})

    async def attack() -> dict[str, Any]:
        transport = Transport(NodeKey.generate(), cluster_keys(split), name="insider", software_version="test")
        got: dict[str, Any] = {"slots": []}
        try:
            to_head = await transport.connect("127.0.0.1", int(head.runtime["peer_port"]), expect_node_id=head.node_id)
            to_mid = await transport.connect("127.0.0.1", int(middle.runtime["peer_port"]),
                                             expect_node_id=middle.node_id)

            def step(session: str, inputs: np.ndarray) -> dict[str, Any]:
                return {"model": model_id, "epoch": epoch, "session": session, "step": 0, "kind": "prefill",
                        "start": 0, "inputs": inputs, "last": False, "timeout": 20.0}

            async def code(conn: Any, method: str, body: Any) -> str:
                try:
                    await conn.request(method, body, timeout=60)
                    return "ok"
                except RemoteError as exc:
                    return f"{exc.code}: {exc.message}"

            got["head"] = await code(to_head, "pipe.step", step("0f0f0f0f", np.asarray([1], np.int64)))
            got["nan"] = await code(to_mid, "pipe.step", step("0f0f0f0f", np.full((1, 64), np.nan, np.float32)))
            future = {"model": model_id, "name": "pipe-model", "epoch": ((int(time.time()) + 3600) * 1000) << 10,
                      "plan": {"stages": [{"node_id": head.node_id, "start": 0, "end": 6, "memory": 1}]},
                      "index": 0, "max_context": CONTEXT, "slots": SLOTS, "prefill_chunk": CHUNK,
                      "dtype": "float32", "weights": "native"}
            got["future"] = await code(to_head, "pipe.load", future)
            await to_head.request("pipe.lease", {"model": model_id, "epoch": epoch, "ttl": 30.0}, timeout=30)
            for i in range(SLOTS):
                got["slots"].append(await code(to_head, "pipe.step", step(f"0e0e0e0{i}", np.asarray([1], np.int64))))
            for i in range(SLOTS):
                await to_head.request("pipe.close", {"model": model_id, "session": f"0e0e0e0{i}"}, timeout=30)
            await to_head.request("pipe.release", {"model": model_id}, timeout=30)
        finally:
            await transport.close()
        return got

    user_thread = threading.Thread(target=stream)
    user_thread.start()
    got = asyncio.run(attack())
    user_thread.join(timeout=300)
    assert got["head"].startswith("not_a_driver"), got
    assert got["nan"].startswith("not_a_driver"), got
    assert got["future"].startswith("bad_plan") and "ahead" in got["future"], got
    assert got["slots"].count("ok") == SLOTS - 1, got  # one slot stays with the user's driver
    assert all(c == "ok" or c.startswith("busy") for c in got["slots"]), got
    status, lines = user["out"]
    assert status == 200, lines
    assert "".join(x.get("response", "") for x in lines) == tok.decode(reference(tiny, tok.encode("el gato"), 30))
    split.wait_until(lambda: metric(head, "enjambre_pipeline_sessions") == 0, 30, "the insider's sessions freed")


def test_an_unload_during_a_stream_drains_and_the_next_request_still_answers(split: LocalCluster,
                                                                            tiny: Path) -> None:
    """Any driver may stop a model (Ollama's stop), an insider leasing a stage included: the
    stage finishes the sessions it holds before it unloads (the stream answers in full), and
    the next request loads the model again instead of failing or hanging."""
    driver = split.nodes[2]
    entry = json.loads(nodectl(driver, "ps", "--json").stdout)["models"][0]
    model_id, epoch, plan = entry["digest"], int(entry["epoch"]), entry["plan"]
    head = next(n for n in split.nodes if n.node_id == plan[0]["node_id"])
    tok = Tokenizer.from_model_dir(tiny)
    user: dict[str, Any] = {}

    started = threading.Event()

    def stream() -> None:
        req = urllib.request.Request(f"http://{driver.api}/api/generate", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "pipe-model", "prompt": "la casa", "raw": True,
                                                      "options": {"temperature": 0, "num_predict": 120}}).encode())
        lines = []
        with urllib.request.urlopen(req, timeout=300) as resp:
            for raw in resp:
                lines.append(json.loads(raw))
                if len(lines) == 3:
                    started.set()
            user["out"] = (resp.status, lines)
        started.set()

    async def unload() -> dict[str, Any]:
        transport = Transport(NodeKey.generate(), cluster_keys(split), name="insider", software_version="test")
        try:
            conn = await transport.connect("127.0.0.1", int(head.runtime["peer_port"]), expect_node_id=head.node_id)
            await conn.request("pipe.lease", {"model": model_id, "epoch": epoch, "ttl": 30.0}, timeout=30)
            return dict(await conn.request("pipe.unload", {"model": model_id}, timeout=60))
        finally:
            await transport.close()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(120)
    assert asyncio.run(unload()) == {"unloaded": False}  # draining: the live session first
    thread.join(timeout=300)
    status, lines = user["out"]
    assert status == 200, lines
    assert "".join(x.get("response", "") for x in lines) == tok.decode(reference(tiny, tok.encode("la casa"), 120))
    status, lines = post(driver, "/api/generate", {"model": "pipe-model", "prompt": "el sol", "raw": True,
                                                   "options": {"temperature": 0, "num_predict": 8}})
    assert status == 200, lines
    assert "".join(x.get("response", "") for x in lines) == tok.decode(reference(tiny, tok.encode("el sol"), 8))


def test_middle_node_killed_mid_generation_stream_completes_unchanged(split: LocalCluster, tiny: Path) -> None:
    plan = json.loads(nodectl(split.nodes[1], "ps", "--json").stdout)["models"][0]["plan"]
    middle = next(n for n in split.nodes if n.node_id == plan[1]["node_id"])
    driver = next(n for n in split.nodes if n is not middle)
    # The spare holds the whole model (the middle may be the only other full copy).
    spare = next(n for n in split.nodes if n.node_id not in {s["node_id"] for s in plan})
    nodectl(spare, "pull", "pipe-model")
    tok = Tokenizer.from_model_dir(tiny)
    n = 150
    want = reference(tiny, tok.encode("la casa"), n)
    req = urllib.request.Request(f"http://{driver.api}/api/generate", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "pipe-model", "prompt": "la casa", "raw": True,
                                                  "options": {"temperature": 0, "num_predict": n}}).encode())
    got: list[dict[str, Any]] = []
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            got.append(json.loads(raw))
            if len(got) == 20:
                os.kill(middle.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
    assert "error" not in got[-1], got[-1]
    assert "".join(x.get("response", "") for x in got) == tok.decode(want)
    new_plan = json.loads(nodectl(driver, "ps", "--json").stdout)["models"][0]["plan"]
    assert middle.node_id not in {s["node_id"] for s in new_plan}
    assert sum(s["end"] - s["start"] for s in new_plan) == 6
