"""ps from the directory: every node builds the same list from the members' records, with
node names, the newest complete plan of each model, and the latest keep_alive."""

from __future__ import annotations

from typing import Any

from node.pipeline.views import models_view

MODEL = "c" * 64
A, B, C = "a" * 64, "b" * 64, "e" * 64


def serving(start: int, end: int, epoch: int = 7, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "name": "tiny", "start": start, "end": end, "epoch": epoch, "sessions": 1,
            "memory": 100, "layers": 6, "context": 256, "weights": "native", "family": "qwen2", **extra}


def members(*entries: tuple[str, str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {nid: {"name": name, "state": "ready", "serving": s} for nid, name, s in entries}


def test_a_model_loaded_elsewhere_is_listed_with_node_names() -> None:
    view = models_view(members((A, "n0", [serving(0, 2, expires_at=2000.0)]), (B, "n1", [serving(2, 6, expires_at=3000.0)]),
                               (C, "n2", [])), {}, now=1000.0)
    (entry,) = view
    assert entry["name"] == "tiny" and entry["digest"] == MODEL and entry["context_length"] == 256
    assert [(s["node"], s["start"], s["end"]) for s in entry["plan"]] == [("n0", 0, 2), ("n1", 2, 6)]
    assert entry["size"] == 200 and entry["details"]["family"] == "qwen2"
    assert entry["expires_at"] == "1970-01-01T00:50:00Z"  # the latest driver's keep_alive


def test_only_the_newest_complete_epoch_counts() -> None:
    view = models_view(members((A, "n0", [serving(0, 3, epoch=8), serving(0, 2)][:1]),
                               (B, "n1", [serving(2, 6)]), (C, "n2", [serving(0, 2)])), {}, now=0.0)
    (entry,) = view  # epoch 8 lacks layers 3-6: epoch 7 (n2 + n1) is the plan
    assert [s["node"] for s in entry["plan"]] == ["n2", "n1"]
    incomplete = models_view(members((A, "n0", [serving(0, 3)])), {}, now=0.0)
    assert incomplete == []


def test_bad_entries_and_leaving_nodes_are_skipped() -> None:
    view = models_view(members((A, "n0", [serving(0, 6, epoch=-1), {"model": 5}, "x"]),), {}, now=0.0)
    assert view == []
    gone = members((A, "n0", [serving(0, 6)]))
    gone[A]["state"] = "leaving"
    assert models_view(gone, {}, now=0.0) == []


def test_quantization_level_is_the_gguf_blocks_the_nodes_hold() -> None:
    from types import SimpleNamespace

    from node.pipeline.views import _quantization

    gguf = SimpleNamespace(config=SimpleNamespace(matrix_types=(("a", "Q4_K"), ("b", "Q6_K"), ("c", "Q4_K"))),
                           dtype="float32")
    assert _quantization("native", gguf) == "Q4_K"  # type: ignore[arg-type]
    assert _quantization("int8", gguf) == "int8"  # type: ignore[arg-type]
    plain = SimpleNamespace(config=SimpleNamespace(matrix_types=()), dtype="bfloat16")
    assert _quantization("native", plain) == "bfloat16"  # type: ignore[arg-type]
    assert _quantization("native", SimpleNamespace(config=object(), dtype="float32")) == "float32"  # type: ignore[arg-type]
    assert _quantization("native", None) == ""


def test_the_driving_node_shows_its_own_plan_not_an_older_epoch_that_still_tiles() -> None:
    """A dead member's record stays in the directory for the record TTL, and its epoch still
    tiles the layers: the node that re-planned shows its own, newer plan."""
    from types import SimpleNamespace

    from node.pipeline.views import _complete

    old = {7: [(A, serving(0, 2)), (B, serving(2, 6))]}
    driver = SimpleNamespace(plan=SimpleNamespace(stages=[object()]), epoch=8, config=SimpleNamespace(num_layers=6))
    assert _complete(old, driver) is None  # type: ignore[arg-type]  (models_view then takes the driver's plan)
    assert _complete(old, None) == old[7]  # another node: the newest complete epoch it sees
    newer = {**old, 8: [(C, serving(0, 6, epoch=8))]}
    assert _complete(newer, driver) == newer[8]  # type: ignore[arg-type]
