"""Tests for node.tinymodel and scripts/make_tiny_model.py: the files a tiny checkpoint has,
that transformers loads it unchanged, sharding, determinism and non-degenerate output."""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

from node.testing.tinymodel import _split_shards, corpus_path, make_tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[3]

REQUIRED_KEYS = {
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "vocab_size",
    "tie_word_embeddings",
    "hidden_act",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
}


def _tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint dir (sharded or not), as float32 numpy arrays."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                out[name] = sf.get_tensor(name).float().numpy()
    return out


def _digest(path: pathlib.Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny") / "qwen2", arch="qwen2", shards=3, layers=3
    )


def test_corpus_is_bundled_and_sized() -> None:
    text = corpus_path().read_text(encoding="utf-8")
    assert 30_000 <= len(text.encode()) <= 60_000
    assert "ñ" in text and "def " in text and "2024" in text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_files_and_config(arch: str, llama_dir: pathlib.Path, qwen_dir: pathlib.Path) -> None:
    path = llama_dir if arch == "llama" else qwen_dir
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    cfg = json.loads((path / "config.json").read_text())
    assert REQUIRED_KEYS <= cfg.keys()
    assert cfg["hidden_act"] == "silu"
    assert cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]
    assert cfg["vocab_size"] == 512
    if arch == "llama":
        assert cfg["architectures"] == ["LlamaForCausalLM"]
        assert cfg["rope_scaling"]["rope_type"] == "llama3"
        assert cfg["tie_word_embeddings"] is False
        assert "model.safetensors" in names
    else:
        assert cfg["architectures"] == ["Qwen2ForCausalLM"]
        assert cfg["tie_word_embeddings"] is True
        assert "model.safetensors.index.json" in names and "model.safetensors" not in names


def test_weights_names_and_shapes(llama_dir: pathlib.Path, qwen_dir: pathlib.Path) -> None:
    llama = _tensors(llama_dir)
    assert llama["model.embed_tokens.weight"].shape == (512, 64)
    assert llama["lm_head.weight"].shape == (512, 64)
    assert llama["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)  # [out, in]
    assert llama["model.layers.3.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads x 16
    assert llama["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert not any(k.endswith(".bias") for k in llama)
    assert len(llama) == 4 * 9 + 3

    qwen = _tensors(qwen_dir)
    assert "lm_head.weight" not in qwen  # tied
    bias = qwen["model.layers.2.self_attn.k_proj.bias"]
    assert bias.shape == (32,) and np.abs(bias).max() > 0
    assert len(qwen) == 3 * 12 + 2


def test_tokenizer_has_requested_vocab_and_specials(
    llama_dir: pathlib.Path, qwen_dir: pathlib.Path
) -> None:
    for path, specials in (
        (
            llama_dir,
            ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        ),
        (qwen_dir, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    ):
        tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        assert tok.get_vocab_size(with_added_tokens=True) == 512
        tcfg = json.loads((path / "tokenizer_config.json").read_text())
        decoder = {v["content"]: int(k) for k, v in tcfg["added_tokens_decoder"].items()}
        for s in specials:
            assert decoder[s] == tok.token_to_id(s)
            assert tok.encode(s, add_special_tokens=False).ids == [decoder[s]]
        text = "Byte-level BPE: ¿qué tal? 😀 naïve 123456"
        assert tok.decode(tok.encode(text).ids) == text
    gen = json.loads((llama_dir / "generation_config.json").read_text())
    tok = HFTokenizer.from_file(str(llama_dir / "tokenizer.json"))
    assert set(gen["eos_token_id"]) == {
        tok.token_to_id("<|eot_id|>"),
        tok.token_to_id("<|end_of_text|>"),
    }


@pytest.mark.parametrize("vocab", [300, 4000])
def test_vocab_sizes_small_and_padded(tmp_path: pathlib.Path, vocab: int) -> None:
    path = make_tiny_model(tmp_path, arch="qwen2", vocab_size=vocab, layers=1)
    tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == vocab
    assert _tensors(path)["model.embed_tokens.weight"].shape == (vocab, 64)
    if vocab == 4000:
        # The corpus cannot fill 4000 merges: the rest are reserved special tokens, as in Llama 3.
        assert tok.token_to_id("<|reserved_special_token_0|>") is not None


def test_sharded_index_is_consistent(qwen_dir: pathlib.Path) -> None:
    index = json.loads((qwen_dir / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    files = sorted(set(weight_map.values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    total = 0
    seen: set[str] = set()
    for fname in files:
        with safe_open(str(qwen_dir / fname), framework="pt") as sf:
            keys = set(sf.keys())
            assert keys, f"{fname} is empty"
            for k in keys:
                assert weight_map[k] == fname
                t = sf.get_tensor(k)
                total += t.numel() * t.element_size()
            seen |= keys
    assert seen == set(weight_map)
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize(
    ("sizes", "shards"),
    [
        ([10, 10, 10, 10], 2),
        ([1000, 1, 1, 1, 1], 3),  # one huge tensor first must not leave shards empty
        ([1, 1, 1, 1000], 4),
        ([5, 5, 5], 3),
        ([3, 9, 2, 7, 7, 1, 8], 1),
    ],
)
def test_split_shards_contiguous_nonempty(sizes: list[int], shards: int) -> None:
    names = [f"t{i}" for i in range(len(sizes))]
    groups = _split_shards(names, dict(zip(names, sizes, strict=True)), shards)
    assert len(groups) == shards
    assert all(groups)
    assert [n for g in groups for n in g] == names


def test_split_shards_balances_equal_tensors() -> None:
    names = [f"t{i}" for i in range(8)]
    groups = _split_shards(names, dict.fromkeys(names, 100), 4)
    assert [len(g) for g in groups] == [2, 2, 2, 2]


def test_deterministic_for_seed(tmp_path: pathlib.Path) -> None:
    a = make_tiny_model(tmp_path / "a", layers=2, shards=2, seed=7)
    b = make_tiny_model(tmp_path / "b", layers=2, shards=2, seed=7)
    c = make_tiny_model(tmp_path / "c", layers=2, shards=2, seed=8)
    assert _digest(a) == _digest(b)
    da, dc = _digest(a), _digest(c)
    assert da["tokenizer.json"] == dc["tokenizer.json"]
    assert da["model-00001-of-00002.safetensors"] != dc["model-00001-of-00002.safetensors"]


def test_rerun_with_fewer_shards_removes_stale_files(tmp_path: pathlib.Path) -> None:
    make_tiny_model(tmp_path, layers=2, shards=3)
    make_tiny_model(tmp_path, layers=2, shards=1)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]


@pytest.mark.parametrize(("dtype", "expected"), [("bfloat16", "BF16"), ("float16", "F16")])
def test_half_dtypes(tmp_path: pathlib.Path, dtype: str, expected: str) -> None:
    path = make_tiny_model(tmp_path, layers=1, dtype=dtype)
    raw = (path / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {expected}
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == dtype


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "gpt2"}, "unknown arch 'gpt2'"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"heads": 3}, "multiple of heads"),
        ({"kv_heads": 3}, "multiple of kv_heads"),
        ({"hidden": 60, "heads": 4}, "must be even"),
        ({"vocab_size": 100}, "vocab_size must be at least"),
        ({"layers": 0}, "layers must be at least 1"),
        ({"layers": 1, "shards": 50}, "cannot exceed the number of tensors"),
    ],
)
def test_bad_arguments(tmp_path: pathlib.Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_tiny_model(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_cli(tmp_path: pathlib.Path) -> None:
    script = ROOT / "scripts" / "make_tiny_model.py"
    ok = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "m"),
            "--arch",
            "qwen2",
            "--layers",
            "2",
            "--shards",
            "2",
            "--dtype",
            "bfloat16",
            "--vocab",
            "400",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["vocab_size"]) == ("qwen2", 2, 400)
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    # Same bytes from another process: BPE training and weights do not depend on hash seeds.
    same = make_tiny_model(
        tmp_path / "n", arch="qwen2", layers=2, shards=2, dtype="bfloat16", vocab_size=400, seed=3
    )
    assert _digest(same) == _digest(tmp_path / "m")
    bad = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "x"), "--heads", "5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "multiple of heads" in bad.stderr


# --- transformers is the oracle for "a real HF checkpoint" -------------------------------------


def _hf() -> tuple[Any, Any]:
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_loads_and_generates(
    arch: str, llama_dir: pathlib.Path, qwen_dir: pathlib.Path
) -> None:
    torch, transformers = _hf()
    path = llama_dir if arch == "llama" else qwen_dir
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] in (set(), [])
    assert info["unexpected_keys"] in (set(), [])
    assert info["mismatched_keys"] in (set(), [])
    expected_cls = "LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"
    assert type(model).__name__ == expected_cls
    # Our tensors, not a fresh init, must be what transformers holds.
    ours = _tensors(path)
    sd = model.state_dict()
    for name, arr in ours.items():
        np.testing.assert_array_equal(sd[name].numpy(), arr)
    if arch == "llama":
        assert model.config.rope_parameters["rope_type"] == "llama3"
    else:
        np.testing.assert_array_equal(
            sd["lm_head.weight"].numpy(), ours["model.embed_tokens.weight"]
        )

    prompt = torch.tensor([[5, 100, 200, 300, 42]])
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    new = out[0, prompt.shape[1] :].tolist()
    assert len(new) == 32
    assert len(set(new)) >= 8, f"greedy output is degenerate: {new}"


@pytest.mark.parametrize("seed", [1, 2])
def test_greedy_not_degenerate_other_seeds(tmp_path: pathlib.Path, seed: int) -> None:
    torch, transformers = _hf()
    path = make_tiny_model(tmp_path, arch="qwen2", layers=2, seed=seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([[7, 8, 9]]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert len(set(out[0, 3:].tolist())) >= 8
