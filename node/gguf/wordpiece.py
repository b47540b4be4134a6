"""A ``bert`` GGUF's WordPiece vocabulary as tokenizer.json and tokenizer_config.json.

llama.cpp's converter (``convert_hf_to_gguf.py``, BertModel.set_vocab) rewrites BERT's
vocabulary in "phantom space" form: a word-start token ``x`` becomes ``▁x``, a
continuation ``##x`` becomes ``x``, and bracketed specials (``[CLS]``) stay as they are.
Undoing that gives the original WordPiece vocabulary; the tokenizer is BERT's own
(lower-casing normalizer, BERT pre-tokenizer, ``[CLS] text [SEP]``), as its
``tokenizer.ggml.model == "bert"`` (llama.cpp's WPM) runs it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordPiece

from node.gguf.tokenizer import GGUFTokenizerError

__all__ = ["bert_tokenizer_files"]

_PHANTOM = "\u2581"
_CONTROL = 3  # llama.cpp's token type of special tokens
_MAX_TOKENS = 1 << 22


class GGUFWordPieceError(GGUFTokenizerError):
    """A bert GGUF whose vocabulary cannot be a WordPiece tokenizer."""


def _id(md: Mapping[str, Any], key: str, n: int) -> int | None:
    value = md.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise GGUFWordPieceError(f"tokenizer.ggml.{key} must be a token id in [0, {n}), got {value!r}")
    return value


def _original(token: str) -> str:
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith(_PHANTOM):
        return token[1:]
    return "##" + token


def bert_tokenizer_files(md: Mapping[str, Any]) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json for a ``bert`` GGUF's vocabulary."""
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is None or not 1 <= len(tokens) <= _MAX_TOKENS or not all(isinstance(t, str) for t in tokens):
        raise GGUFWordPieceError(f"tokenizer.ggml.tokens must list 1 to {_MAX_TOKENS} strings")
    n = len(tokens)
    types = md.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != n:
        raise GGUFWordPieceError("tokenizer.ggml.token_type must have one entry per token")
    words = [_original(t) for t in tokens]
    vocab: dict[str, int] = {}
    for i, w in enumerate(words):
        vocab.setdefault(w, i)
    unk = _id(md, "unknown_token_id", n)
    cls = _id(md, "cls_token_id", n)
    if cls is None:
        cls = _id(md, "bos_token_id", n)
    sep = _id(md, "seperator_token_id", n)  # llama.cpp's spelling
    if sep is None:
        sep = _id(md, "eos_token_id", n)
    if unk is None or cls is None or sep is None:
        raise GGUFWordPieceError("a bert GGUF must name its unknown, cls and separator token ids")
    pad, mask = _id(md, "padding_token_id", n), _id(md, "mask_token_id", n)
    tok = HFTokenizer(WordPiece(vocab, unk_token=words[unk], max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    named = {i for i in (unk, cls, sep, pad, mask) if i is not None}
    specials = sorted(named | {i for i in range(n) if types is not None and types[i] == _CONTROL})
    tok.add_special_tokens([AddedToken(words[i], special=True, normalized=False) for i in specials])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{words[cls]} $A {words[sep]}", pair=f"{words[cls]} $A {words[sep]} $B:1 {words[sep]}:1",
        special_tokens=[(words[cls], cls), (words[sep], sep)])
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                              "unk_token": words[unk], "cls_token": words[cls], "sep_token": words[sep],
                              "pad_token": words[pad] if pad is not None else None,
                              "mask_token": words[mask] if mask is not None else None}
    context = md.get("bert.context_length")
    if isinstance(context, int) and not isinstance(context, bool) and context > 0:
        config["model_max_length"] = context
    return {"tokenizer.json": tok.to_str().encode("utf-8"),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode("utf-8")}
