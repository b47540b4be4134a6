"""Tiny random Qwen3, Qwen3-MoE, Gemma 3 and Phi-3 checkpoints saved by transformers, each with
a tokenizer of its family trained here: Qwen2's byte-level BPE (NFC, the qwen2 split),
Phi-4-mini's (the GPT-4o split), Gemma's SentencePiece-style BPE with byte fallback (built
as transformers builds GemmaTokenizer from a SentencePiece vocabulary and its scores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from node.gguf.tokenizer import _GPT4O_SPLIT, _QWEN2_SPLIT
from node.testing.tinymodel import corpus_path

ARCHS = ("qwen3", "qwen3moe", "gemma3", "phi3")
MIXED = [
    "Hello, world! ¿Cuánto es 12345 + 678? 日本語のテキスト、Русский текст, naïve façade",
    "emoji 😀👍🎉 and flags 🇪🇸 and 3.14159 pies",
    "def f(x):\n\tif x:\n\t\treturn x  # doubled\n\n    pass\r\n",
    "   leading and trailing spaces   ",
]
_EXTRA = "\n".join(MIXED) + "\nel gato come pescado. Der Hund läuft schnell. 東京は大きい。\n"


def _corpus() -> list[str]:
    text = corpus_path().read_text(encoding="utf-8")[:60_000] + _EXTRA * 3
    return [c for c in text.split("\n\n") if c]


def byte_level_tokenizer(split: str, specials: list[str], vocab_size: int = 600, *, nfc: bool = False) -> HFTokenizer:
    """A byte-level BPE with the family's split regex, trained on the bundled corpus."""
    tok = HFTokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def _save_byte_level(tok: HFTokenizer, out: Path, bos: str | None, eos: str, pad: str | None) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.save_pretrained(str(out))


def gemma_tokenizer(out: Path, pieces: int = 500) -> int:
    """A Gemma-style tokenizer in ``out``: <pad> <eos> <bos> <unk> <mask>, the 256 <0xNN>
    byte tokens, then SentencePiece pieces best first (score minus the rank), with
    transformers' merges for them (generate_merges); returns its size."""
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    learner = HFTokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")  # Gemma has "\n" pieces
    trainer = trainers.BpeTrainer(vocab_size=pieces, min_frequency=2, show_progress=False)
    learner.train_from_iterator(_corpus(), trainer=trainer)
    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
    # Merged pieces first (by the trainer's order), single characters after them, as a
    # SentencePiece BPE vocabulary orders its pieces by score. No multi-digit pieces:
    # Gemma's vocabulary splits digits.
    merged = [t for t, _ in learned if len(t) > 1 and not any(c.isdigit() for c in t)]
    chars = [t for t, _ in learned if len(t) == 1]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab: dict[str, int] = {}
    for t in [*specials, *[f"<0x{b:02X}>" for b in range(256)], *merged, *chars]:
        vocab.setdefault(t, len(vocab))
    scores = {t: (-float(i) if i >= 261 else 0.0) for t, i in vocab.items()}
    merges = generate_merges(vocab, {t: s for t, s in scores.items() if vocab[t] >= 261})
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)  # as Gemma 3 does
    tok.save_pretrained(str(out))
    return len(vocab)


def _config(arch: str, vocab: int, specials: dict[str, int]) -> Any:
    import transformers as T

    common: dict[str, Any] = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=512, **specials)
    if arch == "qwen3":
        return T.Qwen3Config(num_hidden_layers=3, head_dim=32, rope_theta=1_000_000.0, **common)
    if arch == "qwen3moe":
        return T.Qwen3MoeConfig(num_hidden_layers=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
                                moe_intermediate_size=32, norm_topk_prob=True, **common)
    if arch == "gemma3":
        return T.Gemma3TextConfig(num_hidden_layers=7, head_dim=32, sliding_window=8, query_pre_attn_scalar=32,
                                  final_logit_softcapping=30.0, **common)
    rotary = 12  # head_dim 16 * partial_rotary_factor 0.75
    return T.Phi3Config(
        num_hidden_layers=2, partial_rotary_factor=0.75, original_max_position_embeddings=128, sliding_window=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0 + 0.05 * i for i in range(rotary // 2)],
                         "long_factor": [1.5 + 0.25 * i for i in range(rotary // 2)],
                         "original_max_position_embeddings": 128, "partial_rotary_factor": 0.75},
        **common,
    )


def make_tiny_arch(arch: str, out: Path, *, seed: int = 0, layers: int | None = None) -> Path:
    """A tiny random ``arch`` checkpoint (ARCHS) with its family's tokenizer (and, but for
    Gemma's, a chat template of the family's form), saved in ``out``; ``layers`` overrides
    the layer count."""
    import torch
    import transformers as T

    out.mkdir(parents=True, exist_ok=True)
    if arch == "gemma3":
        vocab = gemma_tokenizer(out)
        specials = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    else:
        phi = arch == "phi3"
        names = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"] if phi else \
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = byte_level_tokenizer(_GPT4O_SPLIT if phi else _QWEN2_SPLIT, names, nfc=not phi)
        eos = "<|end|>" if phi else "<|im_end|>"
        _save_byte_level(tok, out, "<|endoftext|>" if phi else None, eos, "<|endoftext|>")
        vocab = tok.get_vocab_size(with_added_tokens=True)
        specials = {"eos_token_id": tok.token_to_id(eos), "pad_token_id": tok.token_to_id("<|endoftext|>")}
        if phi:
            specials["bos_token_id"] = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(seed)
    config = _config(arch, vocab, specials)
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = (config.layer_types * layers)[:layers]
    model = T.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from their initial ones and zeros, so a wrong offset shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if arch == "gemma3" else 1.0))
    model.save_pretrained(str(out))
    if arch != "gemma3":
        tok_config = out / "tokenizer_config.json"
        data = json.loads(tok_config.read_text())
        data["chat_template"] = _PHI_TEMPLATE if arch == "phi3" else _QWEN_TEMPLATE
        tok_config.write_text(json.dumps(data))
    return out


_QWEN_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_PHI_TEMPLATE = (
    "{%- for m in messages %}{{- '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)


def config_json(model_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    return data
