"""Hugging Face tokenizer files from a GGUF file's metadata.

A GGUF (llama.cpp's format, what Ollama stores) carries no tokenizer.json: the vocabulary,
merges, scores, token types, special token ids and chat template live in ``tokenizer.ggml.*``
and ``tokenizer.chat_template`` metadata keys. ``tokenizer_files`` turns that metadata into
``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``, written next to
the model at import, so ``node.engine.tokenizer.Tokenizer.from_model_dir`` loads a GGUF model
exactly like a Hugging Face one and nothing downstream needs to know where it came from.

The tokenizer is rebuilt to encode the way llama.cpp (the runtime these files are made for)
encodes, expressed with the ``tokenizers`` library's own building blocks:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The vocabulary is already spelled in
  the GPT-2 byte alphabet, the merges are listed in the file, and ``tokenizer.ggml.pre`` names
  the regex llama.cpp splits text with before BPE (see ``_PRE_TOKENIZERS``).
- ``tokenizer.ggml.model == "llama"``: SentencePiece BPE. Files usually list no merges, so
  they are recovered from the vocabulary and the scores: SentencePiece joins the adjacent pair
  whose joined piece scores highest, which is BPE with merges ranked by that score.

Where transformers' own GGUF loader encodes differently, this follows llama.cpp: the "smollm"
family splits every digit (and any other numeric character, like "²") apart first, and a
SentencePiece vocabulary gets its "▁" prefix before every stretch of text, also one that
starts with a space or follows a special token, and not at all when add_space_prefix is false.

Only metadata goes in (a dict, arrays as ``GGUFArray`` or lists, as ``read_header`` returns) and bytes come
out; nothing here reads files, and transformers is not needed.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import Tokenizer as HFTokenizer

from protocol.gguf import GGUFArray

__all__ = [
    "MAX_MERGES",
    "SUPPORTED_MODELS",
    "SUPPORTED_PRE_TOKENIZERS",
    "GGUFTokenizerError",
    "merges_from_scores",
    "tokenizer_files",
]

# llama.cpp's token types (gguf-py TokenType / llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_MODELS = ("gpt2", "llama")
# Merges recovered from a SentencePiece vocabulary: about 2 per token (Llama 2's 32k tokens imply
# 61k; SmolLM2's 49k, cut every way, 107k), so 4M is room for 8 times Gemma's 262k tokens.
MAX_MERGES = 1 << 22
_SHORT = 64  # characters; longer tokens are cut by hashing (see _LongPieces)

_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


class GGUFTokenizerError(ValueError):
    """The GGUF's tokenizer metadata is missing, inconsistent, or of a kind not supported."""


# --- byte-level pre-tokenizers (tokenizer.ggml.pre) ---------------------------------------------
#
# The regexes are the ones the models' own tokenizer.json files use, which llama.cpp's
# llama-vocab.cpp reproduces (it spells "(?i:'s|...)" out case by case for its regex engine;
# the `tokenizers` library takes the original form).

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _Pre:
    """How one ``tokenizer.ggml.pre`` family splits text before byte-level BPE."""

    split: str | None  # a regex isolating pieces; None: GPT-2's regex, built into ByteLevel
    digits: bool = False  # every digit its own piece first (llama.cpp's leading "\p{N}")
    ignore_merges: bool = False  # a piece that is a whole vocab entry is taken as is
    add_bos: bool = False  # llama.cpp adds BOS for this family unless the file says not to


_GPT2 = _Pre(None)
_DIGITS_GPT2 = _Pre(None, digits=True)
_QWEN2 = _Pre(_QWEN2_SPLIT)
_LLAMA3 = _Pre(_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)

# Names as llama.cpp's llama-vocab.cpp groups them; an unknown name is refused rather than
# guessed, since a wrong split gives plausible but wrong tokens.
_PRE_TOKENIZERS: dict[str, _Pre] = {
    **dict.fromkeys(
        ("default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion"), _GPT2
    ),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        _DIGITS_GPT2,
    ),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan", "solar-open"),
        _QWEN2,
    ),
    "qwen35": _Pre(_QWEN35_SPLIT),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        _LLAMA3,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _Pre(_LLAMA3_SPLIT)),
    "tekken": _Pre(_TEKKEN_SPLIT, ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _Pre(_GPT4O_SPLIT)),
}
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZERS))


# --- reading and checking the metadata ----------------------------------------------------------


def _list(value: Any) -> Any:
    """A metadata array (GGUFArray, as the parser returns it, or a list) as a list; anything
    else as it is."""
    if isinstance(value, GGUFArray):
        return value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _str_list(md: Mapping[str, Any], key: str) -> list[str] | None:
    value = _list(md.get(key))
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GGUFTokenizerError(f"{key} must be a list of strings, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {'/'.join(kinds) or 'nothing'}"
    return type(value).__name__


def _number_list(md: Mapping[str, Any], key: str, n: int, kind: type) -> list[Any] | None:
    value = _list(md.get(key))
    if value is None:
        return None
    ok = (int,) if kind is int else (int, float)
    if not isinstance(value, list) or not all(
        isinstance(v, ok) and not isinstance(v, bool) for v in value
    ):
        raise GGUFTokenizerError(f"{key} must be a list of {kind.__name__}s, got {_kind(value)}")
    if len(value) != n:
        raise GGUFTokenizerError(
            f"{key} has {len(value)} entries but tokenizer.ggml.tokens has {n}; "
            "the file is damaged or was written by a broken converter"
        )
    return value


def _flag(md: Mapping[str, Any], key: str, default: bool) -> bool:
    value = md.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise GGUFTokenizerError(f"{key} must be true or false, got {value!r}")
    return value


def _token_id(md: Mapping[str, Any], name: str, n: int, default: int | None = None) -> int | None:
    key = f"tokenizer.ggml.{name}_token_id"
    value = md.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFTokenizerError(f"{key} must be a token id (an integer), got {value!r}")
    if not 0 <= value < n:
        raise GGUFTokenizerError(
            f"{key} is {value}, outside the vocabulary of {n} tokens (ids 0..{n - 1})"
        )
    return value


def _tokens(md: Mapping[str, Any]) -> list[str]:
    tokens = _str_list(md, "tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFTokenizerError(
            "the GGUF has no tokenizer.ggml.tokens, so it carries no tokenizer; "
            "it cannot be served as a text model"
        )
    # llama.cpp gives an empty entry a placeholder name; an empty BPE token would be unusable.
    return [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    """Text -> id. A text listed twice keeps its last id, as llama.cpp's lookup does."""
    return {token: i for i, token in enumerate(tokens)}


def _merges(md: Mapping[str, Any], vocab: Mapping[str, int]) -> list[tuple[str, str]] | None:
    lines = _str_list(md, "tokenizer.ggml.merges")
    if lines is None:
        return None
    merges: list[tuple[str, str]] = []
    for i, line in enumerate(lines):
        # Split at the first space after the first character, like llama.cpp.
        cut = line.find(" ", 1)
        left, right = (line[:cut], line[cut + 1 :]) if cut > 0 else ("", "")
        if not left or not right:
            raise GGUFTokenizerError(
                f"tokenizer.ggml.merges[{i}] is {line!r}; a merge must be two tokens "
                "separated by a space"
            )
        for part in (left, right):
            if part not in vocab:
                raise GGUFTokenizerError(
                    f"tokenizer.ggml.merges[{i}] {line!r} uses {part!r}, which is not in "
                    "tokenizer.ggml.tokens"
                )
        merges.append((left, right))
    return merges


def merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int] | None, *,
    short: int = _SHORT, max_merges: int = MAX_MERGES,
) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies, best first.

    SentencePiece (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent pair whose
    joined text is a vocabulary piece with the highest score. So every way of cutting a piece
    into two pieces is a merge, ranked by the joined piece's score; ties go to the lower id
    (the more frequent piece). Control, unknown and byte tokens are not text and take no part.

    A token of up to ``short`` characters is cut every way; a longer one (never in a real
    vocabulary, but a file may hold one of megabytes) in time linear in its length
    (``_LongPieces``). More than ``max_merges`` merges is refused.
    """
    skip = {CONTROL, UNKNOWN, BYTE}
    usable = [
        (i, t) for i, t in enumerate(tokens) if token_types is None or token_types[i] not in skip
    ]
    vocab = {t: i for i, t in usable}
    long_pieces: _LongPieces | None = None
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, token in usable:
        if vocab[token] != i:  # a duplicate text: only the id the lookup returns counts
            continue
        score = -float(scores[i])
        if len(token) <= short:
            for c in range(1, len(token)):
                left, right = token[:c], token[c:]
                if left in vocab and right in vocab:
                    ranked.append((score, i, c, left, right))
        else:
            if long_pieces is None:
                long_pieces = _LongPieces(vocab, short)
            ranked.extend((score, i, c, left, right) for c, left, right in long_pieces.cuts(token))
        if len(ranked) > max_merges:
            raise GGUFTokenizerError(
                f"tokenizer.ggml.tokens implies more than {max_merges} merges (a real SentencePiece "
                "vocabulary implies a few per token); the vocabulary is damaged or hostile"
            )
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


_HASH_MOD = (1 << 61) - 1  # a prime


class _LongPieces:
    """Where a long token can be cut into two vocabulary pieces, in time linear in its length.

    Cutting a token of n characters every way and looking both halves up costs n slices of up
    to n characters (a 100,000-character token took 6 s). Pieces of up to ``short``
    characters are still looked up by slicing (at most ``short`` of each, short ones); longer
    pieces are found by polynomial hashes of the token's prefixes and suffixes (one pass each,
    only as far as the longest piece shorter than the token) against those of the vocabulary's
    long pieces, each match then checked by comparing the text. The base is random, so no file
    can be made to collide on purpose.
    """

    def __init__(self, vocab: Mapping[str, int], short: int) -> None:
        self.vocab, self.short = vocab, short
        self.base = secrets.randbelow(_HASH_MOD - (1 << 16)) + (1 << 16)
        self.by_length: dict[int, dict[int, list[str]]] = {}
        for piece in vocab:
            if len(piece) > short:
                h = 0
                for ch in piece:
                    h = (h * self.base + ord(ch)) % _HASH_MOD
                self.by_length.setdefault(len(piece), {}).setdefault(h, []).append(piece)

    def cuts(self, token: str) -> list[tuple[int, str, str]]:
        n, short, vocab, base = len(token), self.short, self.vocab, self.base
        lefts = {c: token[:c] for c in range(1, min(short, n - 1) + 1) if token[:c] in vocab}
        rights = {c: token[c:] for c in range(max(1, n - short), n) if token[c:] in vocab}
        reach = max((k for k in self.by_length if k < n), default=0)
        h = 0
        for k in range(1, reach + 1):  # token[:k]
            h = (h * base + ord(token[k - 1])) % _HASH_MOD
            if k > short and (found := self._piece(k, h, token.startswith)) is not None:
                lefts[k] = found
        h, power = 0, 1
        for k in range(1, reach + 1):  # token[n - k:]
            h = (ord(token[n - k]) * power + h) % _HASH_MOD
            power = power * base % _HASH_MOD
            if k > short and (found := self._piece(k, h, token.endswith)) is not None:
                rights[n - k] = found
        return [(c, lefts[c], rights[c]) for c in sorted(lefts.keys() & rights.keys())]

    def _piece(self, length: int, h: int, matches: Callable[[str], bool]) -> str | None:
        bucket = self.by_length.get(length, {}).get(h)
        return next((p for p in bucket if matches(p)), None) if bucket else None


# --- building the tokenizer ---------------------------------------------------------------------


def _byte_level(md: Mapping[str, Any], vocab: dict[str, int]) -> tuple[HFTokenizer, bool]:
    """GPT-2 style byte-level BPE; returns the tokenizer and llama.cpp's add-BOS default."""
    pre_name = md.get("tokenizer.ggml.pre") or "default"
    if not isinstance(pre_name, str) or pre_name not in _PRE_TOKENIZERS:
        raise GGUFTokenizerError(
            f"tokenizer.ggml.pre {pre_name!r} is not supported (its text splitting is unknown "
            f"here); supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
    pre = _PRE_TOKENIZERS[pre_name]
    merges = _merges(md, vocab)
    if merges is None:
        raise GGUFTokenizerError(
            "tokenizer.ggml.merges is missing; a gpt2 (byte-level BPE) tokenizer needs its merges"
        )
    tok = HFTokenizer(_bpe(vocab, merges, ignore_merges=pre.ignore_merges))
    steps: list[pre_tokenizers.PreTokenizer] = []
    if pre.digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre.split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(pre.split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok, pre.add_bos


def _sentencepiece(
    md: Mapping[str, Any],
    tokens: Sequence[str],
    vocab: dict[str, int],
    token_types: Sequence[int] | None,
    unk: int | None,
) -> HFTokenizer:
    """SentencePiece BPE as llama.cpp runs it, in the form Hugging Face's LlamaTokenizerFast
    serializes (Llama 2's tokenizer.json): spaces as "▁", a "▁" before the text when the model
    wants one, characters missing from the vocabulary as <0xNN> byte tokens."""
    merges = _merges(md, vocab)
    if merges is None:
        scores = _number_list(md, "tokenizer.ggml.scores", len(tokens), float)
        if scores is None:
            raise GGUFTokenizerError(
                "a llama (SentencePiece) tokenizer needs tokenizer.ggml.scores or "
                "tokenizer.ggml.merges; the file has neither"
            )
        merges = merges_from_scores(tokens, scores, token_types)
    tok = HFTokenizer(
        _bpe(vocab, merges, unk=tokens[unk] if unk is not None else None, byte_fallback=True)
    )
    # llama.cpp writes spaces as "▁" and, with add_space_prefix, puts one "▁" before every
    # stretch of text (the first, and each after a special or user-defined token), even one
    # that already starts with a space: SentencePiece's dummy prefix. Normalizers run on each
    # stretch between added tokens, so Prepend does exactly that (Metaspace would skip the
    # "▁" before text that starts with a space, and after special tokens).
    prefix = _flag(md, "tokenizer.ggml.add_space_prefix", True)
    spaces = normalizers.Replace(" ", _SPACE)
    tok.normalizer = (
        normalizers.Sequence([normalizers.Prepend(_SPACE), spaces]) if prefix else spaces
    )
    steps: list[decoders.Decoder] = [
        decoders.Replace(_SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _bpe(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    *,
    unk: str | None = None,
    byte_fallback: bool = False,
    ignore_merges: bool = False,
) -> models.BPE:
    try:
        return models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk,
            fuse_unk=unk is not None,
            byte_fallback=byte_fallback,
            ignore_merges=ignore_merges,
        )
    except Exception as exc:  # tokenizers raises plain Exception for every invalid model
        raise GGUFTokenizerError(
            f"the GGUF's vocabulary and merges do not form a BPE: {exc}"
        ) from exc


def _add_special_tokens(
    tok: HFTokenizer, tokens: Sequence[str], token_types: Sequence[int] | None, named: set[int]
) -> None:
    """Control and unknown tokens match whole and are special, so decode can skip them;
    user-defined ones (like <think>) match whole but are text. The named bos/eos/unk/pad are
    special too, unless the file marks one an ordinary token (a pad that is "!" must stay text).

    llama.cpp matches these in raw text before running the model's tokenizer, which is what
    added tokens do; each keeps its GGUF id because its text is already in the vocabulary.
    """
    types = token_types or [NORMAL] * len(tokens)
    ordinary = (NORMAL, BYTE) if token_types is not None else ()
    special = [
        i
        for i, t in enumerate(types)
        if t in (CONTROL, UNKNOWN) or (i in named and t not in ordinary)
    ]
    plain = [i for i, t in enumerate(types) if t == USER_DEFINED and i not in named]
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(set(special))]
    )
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in plain])


def _post_processor(
    tokens: Sequence[str], bos: int | None, eos: int | None, add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """What encode(add_special_tokens=True) adds, which is how the engine's Tokenizer applies
    add_bos_token/add_eos_token. Named by alias, so no token text is parsed as a template."""
    specials: list[dict[str, Any]] = []
    head: list[str] = []
    tail: list[str] = []
    if add_bos and bos is not None:
        specials.append({"id": "bos", "ids": [bos], "tokens": [tokens[bos]]})
        head = ["bos"]
    if add_eos and eos is not None:
        specials.append({"id": "eos", "ids": [eos], "tokens": [tokens[eos]]})
        tail = ["eos"]
    second = [f"{p}:1" for p in head] + ["$B:1"] + [f"{p}:1" for p in tail]
    return processors.TemplateProcessing(
        single=[*head, "$A", *tail], pair=[*head, "$A", *tail, *second], special_tokens=specials
    )


def tokenizer_files(metadata: Mapping[str, Any]) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and (when the file names an eos or bos)
    generation_config.json for the tokenizer a GGUF's metadata describes, as JSON bytes.

    Raises GGUFTokenizerError naming the problem when the metadata has no tokenizer, one of
    a kind not supported, or one whose parts disagree.
    """
    model = metadata.get("tokenizer.ggml.model")
    if model is None and "tokenizer.ggml.tokens" not in metadata:
        _tokens(metadata)  # raises "no tokenizer.ggml.tokens"
    if model not in SUPPORTED_MODELS:
        raise GGUFTokenizerError(
            f"tokenizer.ggml.model {model!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODELS)}"
        )
    tokens = _tokens(metadata)
    n = len(tokens)
    token_types = _number_list(metadata, "tokenizer.ggml.token_type", n, int)
    _number_list(metadata, "tokenizer.ggml.scores", n, float)  # checked even when unused
    vocab = _vocab(tokens)

    spm = model == "llama"
    # Without the keys llama.cpp runs a SentencePiece vocabulary with <unk>=0, <s>=1, </s>=2.
    bos = _token_id(metadata, "bos", n, 1 if spm and n > 1 else None)
    eos = _token_id(metadata, "eos", n, 2 if spm and n > 2 else None)
    unk = _token_id(metadata, "unknown", n, 0 if spm else None)
    pad = _token_id(metadata, "padding", n)
    eot = _token_id(metadata, "eot", n)
    eom = _token_id(metadata, "eom", n)

    if spm:
        tok = _sentencepiece(metadata, tokens, vocab, token_types, unk)
        bos_default = True
    else:
        tok, bos_default = _byte_level(metadata, vocab)
    add_bos = _flag(metadata, "tokenizer.ggml.add_bos_token", bos_default)
    add_eos = _flag(metadata, "tokenizer.ggml.add_eos_token", False)
    if add_bos and bos is None:
        raise GGUFTokenizerError(
            "tokenizer.ggml.add_bos_token is true but the file names no tokenizer.ggml.bos_token_id"
        )
    if add_eos and eos is None:
        raise GGUFTokenizerError(
            "tokenizer.ggml.add_eos_token is true but the file names no tokenizer.ggml.eos_token_id"
        )
    named = {i for i in (bos, eos, unk, pad) if i is not None}
    _add_special_tokens(tok, tokens, token_types, named)
    tok.post_processor = _post_processor(tokens, bos, eos, add_bos, add_eos)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    for key, idx in (
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ):
        # An explicit null keeps the engine from falling back to another file's id.
        config[key] = tokens[idx] if idx is not None else None
    arch = metadata.get("general.architecture")
    context = metadata.get(f"{arch}.context_length") if isinstance(arch, str) else None
    if isinstance(context, int) and not isinstance(context, bool) and context > 0:
        config["model_max_length"] = context
    template = metadata.get("tokenizer.chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise GGUFTokenizerError(
                f"tokenizer.chat_template must be a string, got {type(template).__name__}"
            )
        config["chat_template"] = template

    files = {
        "tokenizer.json": tok.to_str().encode("utf-8"),
        "tokenizer_config.json": _json(config),
    }
    stops = list(dict.fromkeys(i for i in (eos, eot, eom) if i is not None))
    generation: dict[str, Any] = {}
    if bos is not None:
        generation["bos_token_id"] = bos
    if stops:
        generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if generation:
        files["generation_config.json"] = _json(generation)
    return files


def _json(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
