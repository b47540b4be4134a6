"""node.gguf.config.hf_config: GGUF metadata to config.json, and every malformed value, of any
type, refused with GGUFConfigError naming its key (seeded random mutations of a valid block)."""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import pytest

from node.gguf.config import GGUFConfigError, hf_config
from protocol.gguf import GGUFArray, parse_gguf


def _tokens(n: int) -> GGUFArray:
    """A tokenizer.ggml.tokens array as the parser returns it."""
    items = b"".join(struct.pack("<Q", 1) + b"t" for _ in range(n))
    key = b"tokenizer.ggml.tokens"
    data = b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, len(key)) + key + struct.pack("<IIQ", 9, 8, n) + items
    value = parse_gguf(lambda off, k: data[off : off + k], len(data), "t.gguf").metadata[key.decode()]
    assert isinstance(value, GGUFArray)
    return value


VALID: dict[str, Any] = {
    "general.architecture": "llama",
    "llama.attention.head_count": 8,
    "llama.attention.head_count_kv": 2,
    "llama.embedding_length": 512,
    "llama.block_count": 4,
    "llama.feed_forward_length": 1024,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.rope.freq_base": 500000.0,
    "llama.context_length": 2048,
    "llama.vocab_size": 1000,
    "llama.attention.key_length": 64,
    "llama.rope.dimension_count": 64,
    "llama.rope.scaling.type": "linear",
    "llama.rope.scaling.factor": 2.0,
    "tokenizer.ggml.tokens": _tokens(1000),
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
}
_HOSTILE: list[Any] = [
    None, True, False, 0, 1, -1, 3, 7, 2**31, 2**63, 2**64 + 1, -(2**63), 10**400,
    0.0, -0.0, -1.0, 0.5, 1e308, 1e-320, math.nan, math.inf, -math.inf,
    "", "7", "llama", "linear", "yarn", "none", "qwen2", b"x", [], [1, 2], ["a"], [math.nan], {}, {"a": 1},
    (1,), _tokens(0), _tokens(3), object(),
]


def _mutate(rng: random.Random) -> tuple[dict[str, Any], list[str], list[float] | None]:
    md = dict(VALID)
    keys = rng.sample(sorted(VALID), rng.choice([1, 1, 1, 2, 3]))
    for key in keys:
        value = rng.choice(_HOSTILE)
        if value is None and rng.random() < 0.5:
            del md[key]
        else:
            md[key] = value
    factors: list[float] | None = None
    if rng.random() < 0.3:
        factors = [1.0] * 32
        if rng.random() < 0.5:
            factors[rng.randrange(32)] = rng.choice([0.0, -1.0, math.nan, math.inf])
        if rng.random() < 0.2:
            factors = factors[: rng.randrange(40)]
    return md, keys, factors


def test_a_valid_block() -> None:
    config = hf_config(VALID, tied=True, rope_factors=[1.0] * 32)
    assert config["head_dim"] == 64 and config["num_key_value_heads"] == 2 and config["vocab_size"] == 1000
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and config["bos_token_id"] == 1
    md = {k: v for k, v in VALID.items() if k not in ("llama.vocab_size", "llama.attention.key_length",
                                                     "llama.rope.dimension_count")}
    config = hf_config(md, tied=False)
    assert config["vocab_size"] == 1000 and config["head_dim"] == 64  # from the tokens; 512 / 8


@pytest.mark.parametrize("seed", range(4))
def test_fuzzed_metadata_is_refused_cleanly_naming_the_key(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(1000):
        md, keys, factors = _mutate(rng)
        try:
            config = hf_config(md, tied=rng.random() < 0.5, rope_factors=factors)
        except GGUFConfigError as exc:
            named = [*keys, "rope_freqs.weight"] if factors is not None else keys
            assert "general.architecture" in keys or any(k in str(exc) for k in named), (str(exc), keys)
            assert len(str(exc)) < 400
            continue
        json.dumps(config, allow_nan=False)  # finite numbers only
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            assert type(config[key]) is int and 1 <= config[key] < 2**31, (key, config[key])
        assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
        assert config["head_dim"] % 2 == 0
        for key in ("rms_norm_eps", "rope_theta"):
            assert type(config[key]) is float and 0 < config[key] < math.inf


@pytest.mark.parametrize(("change", "message"), [
    ({"llama.attention.head_count": 0}, "'llama.attention.head_count' should be an integer from 1"),
    ({"llama.attention.head_count_kv": 3}, "head_count_kv 3 should divide"),
    ({"llama.attention.key_length": None, "llama.rope.dimension_count": None, "llama.embedding_length": 500},
     "not a whole number"),
    ({"llama.attention.key_length": 63}, "'llama.attention.key_length'.* is 63; rotary embeddings need it even"),
    ({"llama.attention.layer_norm_rms_epsilon": math.nan}, "'llama.attention.layer_norm_rms_epsilon' should be a positive"),
    ({"llama.rope.scaling.type": ["linear"]}, "llama.rope.scaling.type"),
    ({"general.architecture": ["llama"]}, r"architecture \['llama'\] is not supported"),
    ({"llama.vocab_size": None, "tokenizer.ggml.tokens": "abc"}, "no llama.vocab_size and no tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.eos_token_id": 1000}, r"eos_token_id 1000 is outside the vocabulary of 1000 tokens \(llama.vocab_size\)"),
    ({"tokenizer.ggml.bos_token_id": "1"}, "'tokenizer.ggml.bos_token_id' should be an integer from 0"),
])
def test_malformed_values_are_named(change: dict[str, Any], message: str) -> None:
    md = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    with pytest.raises(GGUFConfigError, match=message):
        hf_config(md, tied=True)


def test_rope_factors_are_checked() -> None:
    with pytest.raises(GGUFConfigError, match=r"rope_freqs\.weight has 3 factors; head_dim 64 needs 32"):
        hf_config(VALID, tied=True, rope_factors=[1.0] * 3)
    with pytest.raises(GGUFConfigError, match=r"rope_freqs\.weight should hold positive finite"):
        hf_config(VALID, tied=True, rope_factors=[1.0] * 31 + [math.nan])


def test_rope_freqs_is_read_only_when_its_size_is_plausible() -> None:
    from node.gguf.sidecar import sidecar_files
    from protocol.gguf import GGUFHeader
    from protocol.safetensors import TensorInfo

    asked: list[int] = []

    def read(offset: int, length: int) -> bytes:
        asked.append(length)
        return bytes(length)

    huge = TensorInfo("rope_freqs.weight", "m.gguf", "F32", (1 << 28,), 0, 4 << 28)  # a GiB of "factors"
    header = GGUFHeader(3, VALID, [huge], 32, 0)
    with pytest.raises(GGUFConfigError, match=r"rope_freqs\.weight should be a 1-D F32 tensor of at most"):
        sidecar_files(header, read)
    assert asked == []
    short = TensorInfo("rope_freqs.weight", "m.gguf", "F32", (32,), 0, 128)
    with pytest.raises(GGUFConfigError, match="runs past the end"):
        sidecar_files(GGUFHeader(3, VALID, [short], 32, 0), lambda off, n: b"\0" * 100)
