"""Tiny random Hugging Face-format checkpoints for tests, demos and benchmarks.

Owns `make_tiny_model`: a Llama-3- or Qwen2-shaped model (config.json, safetensors weights,
optionally sharded with an index, a byte-level BPE tokenizer trained on the bundled corpus,
tokenizer_config.json with a chat template, generation_config.json). Only numpy, safetensors
and tokenizers are used, so the demo runs on machines without torch or JAX.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["ARCHS", "DTYPES", "corpus_path", "make_tiny_model"]

ARCHS = ("llama", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")

# The Llama 3 / Qwen2 pre-tokenizer split: contractions, letter runs, 1-3 digit groups,
# punctuation runs, newlines and spaces, so trained merges look like a real model's.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "        {{- raise_exception('Unknown role ' + message['role'] + '; use system, user, assistant or tool') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'system' and loop.first %}\n"
    "        {%- continue %}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "        {{- raise_exception('Unknown role ' + message['role'] + '; use system, user, assistant or tool') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


@dataclass(frozen=True)
class _ArchSpec:
    architecture: str
    model_type: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str  # tokenizer_config eos_token: what ends an assistant turn
    pad: str
    extra_stop: tuple[str, ...]  # also stops generation (generation_config eos list)
    chat_template: str
    rope_theta: float
    adds_bos: bool


_SPECS: dict[str, _ArchSpec] = {
    "llama": _ArchSpec(
        architecture="LlamaForCausalLM",
        model_type="llama",
        specials=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        extra_stop=("<|end_of_text|>",),
        chat_template=LLAMA_CHAT_TEMPLATE,
        rope_theta=500000.0,
        adds_bos=True,
    ),
    "qwen2": _ArchSpec(
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra_stop=("<|endoftext|>",),
        chat_template=QWEN2_CHAT_TEMPLATE,
        rope_theta=1000000.0,
        adds_bos=False,
    ),
}


def corpus_path() -> pathlib.Path:
    """Path of the bundled tokenizer training text."""
    return pathlib.Path(__file__).resolve().parents[1] / "data" / "corpus.txt"


def _check_args(
    arch: str,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab_size: int,
    shards: int,
    dtype: str,
) -> None:
    if arch not in _SPECS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    for name, value in (
        ("layers", layers),
        ("hidden", hidden),
        ("heads", heads),
        ("kv_heads", kv_heads),
        ("intermediate", intermediate),
        ("shards", shards),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if (hidden // heads) % 2:
        raise ValueError(
            f"head_dim = hidden/heads = {hidden // heads} must be even for rotary embeddings"
        )
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    spec = _SPECS[arch]
    # Byte-level BPE needs all 256 byte symbols plus the special tokens.
    minimum = 256 + len(spec.specials)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be at least {minimum} for arch {arch} (256 bytes + special tokens), got {vocab_size}"
        )


def _train_tokenizer(spec: _ArchSpec, vocab_size: int) -> HFTokenizer:
    tok = HFTokenizer(models.BPE(byte_fallback=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    n_special = len(spec.specials)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    text = corpus_path().read_text(encoding="utf-8")
    # Paragraph-sized chunks: the trainer counts words per sequence, chunking only saves memory.
    chunks = [c for c in text.split("\n\n") if c]
    tok.train_from_iterator(chunks, trainer=trainer)
    # A small corpus cannot fill a big vocabulary with merges; pad with reserved special
    # tokens, as Llama 3 does, so the vocabulary (and the embedding) has the requested size.
    n_reserved = vocab_size - n_special - tok.get_vocab_size(with_added_tokens=True)
    added = list(spec.specials) + [f"<|reserved_special_token_{i}|>" for i in range(n_reserved)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    if spec.adds_bos:
        assert spec.bos is not None
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{spec.bos}:0 $A:0",
                    pair=f"{spec.bos}:0 $A:0 {spec.bos}:1 $B:1",
                    special_tokens=[(spec.bos, bos_id)],
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(
            f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, expected {vocab_size}"
        )
    return tok


def _tokenizer_config(spec: _ArchSpec, tok: HFTokenizer) -> dict[str, Any]:
    decoder: dict[str, dict[str, Any]] = {}
    for idx, added in sorted(tok.get_added_tokens_decoder().items()):
        decoder[str(idx)] = {
            "content": added.content,
            "lstrip": added.lstrip,
            "normalized": added.normalized,
            "rstrip": added.rstrip,
            "single_word": added.single_word,
            "special": added.special,
        }
    return {
        "added_tokens_decoder": decoder,
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "unk_token": None,
        "chat_template": spec.chat_template,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _model_config(
    spec: _ArchSpec,
    tok: HFTokenizer,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab_size: int,
    dtype: str,
    tied: bool,
) -> dict[str, Any]:
    stop = [tok.token_to_id(spec.eos), *(tok.token_to_id(t) for t in spec.extra_stop)]
    bos_id = tok.token_to_id(spec.bos) if spec.bos else tok.token_to_id(spec.pad)
    cfg: dict[str, Any] = {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "attention_bias": spec.model_type == "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": stop if spec.model_type == "llama" else stop[0],
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 4096,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5 if spec.model_type == "llama" else 1e-6,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if spec.model_type == "llama":
        cfg["mlp_bias"] = False
        cfg["pretraining_tp"] = 1
        # Chosen so that, with head_dim 16 and theta 5e5, rotary frequencies fall in all three
        # llama3 bands (kept, smoothed, divided by factor): an engine that ignores it diverges.
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        }
    else:
        cfg["rope_scaling"] = None
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
        cfg["max_window_layers"] = layers
    return cfg


def _weights(
    spec: _ArchSpec,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab_size: int,
    tied: bool,
    seed: int,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads

    def linear(out_dim: int, in_dim: int, gain: float = 1.0) -> np.ndarray:
        # std 1/sqrt(fan_in) keeps activations at unit scale through every layer, so the layers
        # (not the last input token) decide the next token; the usual 0.02 init gives a model
        # whose greedy output repeats one token forever.
        return (rng.standard_normal((out_dim, in_dim)) * (gain / np.sqrt(in_dim))).astype(
            np.float32
        )

    def norm(dim: int) -> np.ndarray:
        # Not all ones, so an engine that skips the norm weight produces different logits.
        return (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32)

    # Sharper attention (score std ~6 instead of ~1): near-uniform attention averages the
    # context into a slowly changing state and greedy decoding locks onto one token.
    qk_gain = 2.5
    w: dict[str, np.ndarray] = {}
    # Embeddings of norm ~1 against layer outputs of norm ~sqrt(hidden): with tied weights the
    # input token's own embedding would otherwise win the logits and the model would echo it.
    w["model.embed_tokens.weight"] = (
        rng.standard_normal((vocab_size, hidden)) / np.sqrt(hidden)
    ).astype(np.float32)
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "self_attn.q_proj.weight"] = linear(heads * head_dim, hidden, qk_gain)
        w[p + "self_attn.k_proj.weight"] = linear(kv_heads * head_dim, hidden, qk_gain)
        w[p + "self_attn.v_proj.weight"] = linear(kv_heads * head_dim, hidden)
        if spec.model_type == "qwen2":
            w[p + "self_attn.q_proj.bias"] = (0.1 * rng.standard_normal(heads * head_dim)).astype(
                np.float32
            )
            w[p + "self_attn.k_proj.bias"] = (
                0.1 * rng.standard_normal(kv_heads * head_dim)
            ).astype(np.float32)
            w[p + "self_attn.v_proj.bias"] = (
                0.1 * rng.standard_normal(kv_heads * head_dim)
            ).astype(np.float32)
        w[p + "self_attn.o_proj.weight"] = linear(hidden, heads * head_dim)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        w[p + "mlp.gate_proj.weight"] = linear(intermediate, hidden)
        w[p + "mlp.up_proj.weight"] = linear(intermediate, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, intermediate)
    w["model.norm.weight"] = norm(hidden)
    if not tied:
        w["lm_head.weight"] = linear(vocab_size, hidden)
    return w


def _cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return arr
    if dtype == "float16":
        return arr.astype(np.float16)
    import ml_dtypes  # numpy has no bfloat16; ml_dtypes is what safetensors.numpy understands

    return arr.astype(ml_dtypes.bfloat16)


def _split_shards(names: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Contiguous groups of tensors with roughly equal byte counts, none empty."""
    if shards > len(names):
        raise ValueError(f"shards ({shards}) cannot exceed the number of tensors ({len(names)})")
    total = sum(sizes[n] for n in names) or 1
    groups: list[list[str]] = [[] for _ in range(shards)]
    current = 0
    acc = 0
    for idx, name in enumerate(names):
        wanted = min(acc * shards // total, shards - 1)
        must_advance = len(names) - idx <= shards - 1 - current  # rest only just fills the rest
        if groups[current] and (wanted > current or must_advance):
            current += 1
        groups[current].append(name)
        acc += sizes[name]
    return groups


def _write_json(path: pathlib.Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    arch: str = "llama",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int = 512,
    shards: int = 1,
    dtype: str = "float32",
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
) -> pathlib.Path:
    """Write a tiny random checkpoint in Hugging Face format to `out_dir` and return its path.

    `tie_word_embeddings=None` picks the family's usual choice: untied for llama, tied for
    qwen2 (like Qwen2.5-0.5B). The output depends only on the arguments and the bundled corpus.
    """
    _check_args(arch, layers, hidden, heads, kv_heads, intermediate, vocab_size, shards, dtype)
    spec = _SPECS[arch]
    tied = (arch == "qwen2") if tie_word_embeddings is None else bool(tie_word_embeddings)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(spec, vocab_size)
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(spec, tok))

    cfg = _model_config(
        spec,
        tok,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab_size=vocab_size,
        dtype=dtype,
        tied=tied,
    )
    _write_json(out / "config.json", cfg)
    stop = [tok.token_to_id(spec.eos), *(tok.token_to_id(t) for t in spec.extra_stop)]
    gen: dict[str, Any] = {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": stop,
        "pad_token_id": tok.token_to_id(spec.pad),
        "do_sample": False,
        "transformers_version": "4.45.0",
    }
    _write_json(out / "generation_config.json", gen)

    weights = _weights(
        spec,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab_size=vocab_size,
        tied=tied,
        seed=seed,
    )
    weights = {k: _cast(v, dtype) for k, v in weights.items()}
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    for stale in list(out.glob("model*.safetensors")) + list(
        out.glob("model.safetensors.index.json")
    ):
        stale.unlink()  # a rerun with another shard count must not leave old shards behind
    if shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata=metadata)
    else:
        names = list(weights)
        sizes = {n: int(weights[n].nbytes) for n in names}
        weight_map: dict[str, str] = {}
        for i, group in enumerate(_split_shards(names, sizes, shards)):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: weights[n] for n in group}, str(out / fname), metadata=metadata)
            weight_map.update(dict.fromkeys(group, fname))
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        _write_json(out / "model.safetensors.index.json", index)
    return out
