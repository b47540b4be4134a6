"""scripts/generate.py end to end on a tiny checkpoint made by node.tinymodel."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

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
from node.testing.tinymodel import make_tiny_model

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "generate.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("gen") / "m", arch="qwen2", layers=3, shards=2)


def _expected(model_dir: Path, prompt: list[int], n: int) -> str:
    config = load_config(model_dir)
    tok = Tokenizer.from_model_dir(model_dir)
    chain = load_chain(
        WeightSource.from_dir(model_dir), config, [PartitionSpec.whole(config)], dtype="float32"
    )
    ids = [
        t for t, _ in generate(chain, prompt, SamplingParams(stop_token_ids=tok.stop_token_ids), n)
    ]
    return tok.decode(ids)


def test_generate_prints_only_generated_text(
    script: ModuleType, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = Tokenizer.from_model_dir(model_dir)
    expected = _expected(model_dir, tok.encode("hello world"), 12)
    outs = []
    for parts in ("1", "3"):
        rc = script.main(
            [str(model_dir), "--prompt", "hello world", "--max-tokens", "12", "--partitions", parts]
        )
        captured = capsys.readouterr()
        assert rc == 0
        assert "tok/s" in captured.err and "tok/s" not in captured.out
        outs.append(captured.out)
    assert outs[0] == outs[1] == expected


def test_generate_chat_uses_template(
    script: ModuleType, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = Tokenizer.from_model_dir(model_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected = _expected(model_dir, tok.encode_chat(messages), 8)
    rc = script.main(
        [str(model_dir), "--prompt", "hi", "--chat", "--system", "be brief", "--max-tokens", "8"]
    )
    assert rc == 0
    assert capsys.readouterr().out == expected


def test_generate_reports_engine_errors(
    script: ModuleType, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = script.main(
        [str(model_dir), "--prompt", "hello " * 40, "--max-tokens", "4", "--max-context", "16"]
    )
    assert rc == 1
    assert "error:" in capsys.readouterr().err
