"""Tests for node.gguf.tokenizer: the Hugging Face tokenizer files built from a GGUF's metadata
load in the engine's Tokenizer and encode like transformers' own GGUF loader (which the real
SmolLM2 file and small GGUFs written here with the gguf package are checked against)."""

from __future__ import annotations

import json
import pathlib
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers

from node.engine.tokenizer import Tokenizer, TokenizerError
from node.gguf.files import read_header
from node.gguf.tokenizer import (
    SUPPORTED_MODELS,
    GGUFTokenizerError,
    merges_from_scores,
    tokenizer_files,
)
from tests.helpers.smollm2 import smollm2_path

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

SAMPLES = [
    "Hello, world!",
    "¿Cuánto es dos más dos?",
    "def f(x):\n\tif x:\n\t\treturn x  # doubled\n\n    pass\r\n",
    "emoji 😀👍🎉 and flags 🇪🇸 and a family 👨‍👩‍👧",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "I have 12345 apples, 3.14 pies and 2024-01-02 dates",
    "   leading and trailing spaces   ",
    "日本語のテキスト、Русский текст, naïve façade",
    "",
]


def _load(metadata: Mapping[str, Any], root: pathlib.Path) -> Tokenizer:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_files(metadata).items():
        (root / name).write_bytes(data)
    return Tokenizer.from_model_dir(root)


def _reference(path: pathlib.Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# --- the real SmolLM2-135M-Instruct GGUF (byte-level BPE, pre "smollm") -------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[pathlib.Path, dict[str, Any]]:
    path = smollm2_path()
    return path, read_header(path).metadata


@pytest.fixture(scope="module")
def smol(
    smollm2: tuple[pathlib.Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Tokenizer:
    return _load(smollm2[1], tmp_path_factory.mktemp("smol") / "model")


@pytest.fixture(scope="module")
def smol_ref(smollm2: tuple[pathlib.Path, dict[str, Any]]) -> Any:
    return _reference(smollm2[0])


def test_smollm2_chat_prompt_matches_transformers(smol: Tokenizer, smol_ref: Any) -> None:
    messages = [{"role": "user", "content": "What is two plus two?"}]
    text = smol.apply_chat_template(messages, add_generation_prompt=True)
    assert text == smol_ref.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ref_ids = smol_ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ref_ids, list):  # transformers 5 returns a BatchEncoding
        ref_ids = list(ref_ids["input_ids"])
    assert smol.encode_chat(messages) == ref_ids
    assert ref_ids[0] == 1 and ref_ids.count(2) == 2  # <|im_start|> ... <|im_end|> kept whole


@pytest.mark.parametrize("text", SAMPLES)
def test_smollm2_encode_matches_transformers(smol: Tokenizer, smol_ref: Any, text: str) -> None:
    ids = smol.encode(text)
    assert ids == smol_ref.encode(text)
    assert ids == smol.encode(text, add_special_tokens=False)  # the file says add_bos false
    assert smol.decode(ids, skip_special_tokens=False) == text
    assert smol.decode(ids) == smol_ref.decode(ids, skip_special_tokens=True)


def test_smollm2_digits_split_like_llama_cpp(
    smol: Tokenizer, smol_ref: Any, smollm2: tuple[pathlib.Path, dict[str, Any]]
) -> None:
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) isolates every
    # \p{N} character before the GPT-2 regex; transformers' GGUF loader only runs the GPT-2
    # regex. The vocabulary has no multi-digit tokens, so ASCII digits agree anyway (above),
    # but a numeric like "²" after a space differs: " ²" is one piece for transformers.
    ids = smol.encode("1234567890", add_special_tokens=False)
    assert [smol.decode([i]) for i in ids] == list("1234567890")
    assert smol.decode(smol.encode(" ²")) == " ²"
    assert smol.encode(" ²") == [smol.token_to_id("Ġ"), smol.token_to_id("Â²")]
    assert smol_ref.encode(" ²") != smol.encode(" ²")
    # transformers with SmolLM2's original pre-tokenizer restored encodes exactly like ours.
    original = HFTokenizer.from_str(smol_ref.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    for text in [" ²", "x²³ ³²", "½ cup", *SAMPLES]:
        assert smol.encode(text) == original.encode(text).ids


def test_smollm2_special_and_stop_tokens(smol: Tokenizer, tmp_path: pathlib.Path) -> None:
    assert smol.eos_token_id == 2 and smol.token_to_id("<|im_end|>") == 2
    assert 2 in smol.stop_token_ids
    assert smol.bos_token_id == 1
    assert smol.vocab_size == 49152
    ids = smol.encode("<|im_start|>assistant\nok<|im_end|>")
    assert smol.decode(ids) == "assistant\nok"


def test_smollm2_config_files(smollm2: tuple[pathlib.Path, dict[str, Any]]) -> None:
    files = tokenizer_files(smollm2[1])
    config = json.loads(files["tokenizer_config.json"])
    assert config["chat_template"] == smollm2[1]["tokenizer.chat_template"]
    assert config["eos_token"] == "<|im_end|>" and config["bos_token"] == "<|im_start|>"
    assert config["pad_token"] == "<|im_end|>" and config["unk_token"] == "<|endoftext|>"
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["model_max_length"] == 8192
    assert json.loads(files["generation_config.json"]) == {"bos_token_id": 1, "eos_token_id": 2}


# --- a SentencePiece ("llama") GGUF written here -----------------------------------------------

_PIECES = [  # best (highest score) first; each is two shorter pieces joined
    "▁t", "he", "▁the", "in", "▁a", "ll", "▁w", "or", "ld", "▁wor", "▁world", "▁h", "▁he",
    "llo", "▁hello", "ing", "▁th", "▁thing", "▁▁", "▁▁▁▁", "er", "▁H", "el", "▁Hel", "▁Hello",
    "an", "▁an", "▁and", "▁s", "▁sp", "ac", "es", "▁spac", "▁spaces", "▁in",
]  # fmt: skip
_CHARS = ["▁", *string.ascii_lowercase, *"HW,.!'?0123456789"]


def _spm_gguf(path: pathlib.Path, **flags: Any) -> pathlib.Path:
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    types = [2, 3, 3, *[6] * 256]
    tokens += _PIECES
    scores = [0.0] * 259 + [-float(i) for i in range(len(_PIECES))]
    tokens += _CHARS
    scores += [-1000.0 - i for i in range(len(_CHARS))]
    tokens += ["<tool>"]
    scores += [0.0]
    types += [1] * (len(_PIECES) + len(_CHARS)) + [4]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if "add_space_prefix" in flags:
        w.add_add_space_prefix(flags["add_space_prefix"])
    if "add_bos" in flags:
        w.add_add_bos_token(flags["add_bos"])
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_SAMPLES = [
    "hello world",
    "Hello world!",
    "the thing and the spaces",
    "  two leading spaces",
    " one leading space",
    "trailing spaces   ",
    "héllo wörld 日本 😀",  # é, ö, CJK and emoji are not pieces: <0xNN> byte fallback
    "a<tool>b and <tool> c",
    "hello</s>world<s> again",
    "new\nline\ttab",
    "",
]


# Where llama.cpp and transformers' GGUF loader agree: no leading space, and no text right
# after a special or user-defined token (see test_sentencepiece_space_prefix_like_llama_cpp).
SPM_AGREE = [t for t in SPM_SAMPLES if not t.startswith(" ") and "<" not in t]


@dataclass
class Spm:
    ours: Tokenizer
    ref: Any  # transformers' own tokenizer for the GGUF
    legacy: HFTokenizer  # the same, with the dummy prefix applied as llama.cpp applies it
    root: pathlib.Path
    flags: dict[str, Any]


@pytest.fixture(scope="module", params=[{}, {"add_space_prefix": False}, {"add_bos": False}])
def spm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Spm:
    root = tmp_path_factory.mktemp("spm")
    path = _spm_gguf(root / "spm.gguf", **request.param)
    ours = _load(read_header(path).metadata, root / "model")
    ref = _reference(path)
    # transformers splits with Metaspace(prepend_scheme="first"): no "▁" is added before text
    # that starts with a space, nor before text after a special token, and it ignores
    # tokenizer.ggml.add_space_prefix. llama.cpp (like SentencePiece and Llama 2's own
    # tokenizer.json) prefixes every stretch of text. Same vocabulary and merges otherwise.
    legacy = HFTokenizer.from_str(ref.backend_tokenizer.to_str())
    spaces = normalizers.Replace(" ", "▁")
    prefix = request.param.get("add_space_prefix", True)
    legacy.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if prefix else spaces
    )
    legacy.pre_tokenizer = None
    if not prefix:
        legacy.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
    return Spm(ours, ref, legacy, root / "model", dict(request.param))


@pytest.mark.parametrize("text", SPM_SAMPLES)
def test_sentencepiece_matches_transformers(spm: Spm, text: str) -> None:
    ours = spm.ours
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == spm.legacy.encode(text, add_special_tokens=special).ids
        if text in SPM_AGREE and spm.flags.get("add_space_prefix", True):
            assert ids == spm.ref.encode(text, add_special_tokens=special)
    ids = ours.encode(text)
    assert ours.decode(ids) == spm.legacy.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == spm.legacy.decode(
        ids, skip_special_tokens=False
    )
    if "<" not in text:
        assert ours.decode(ids) == text


def test_sentencepiece_space_prefix_like_llama_cpp(spm: Spm) -> None:
    ours, ids = spm.ours, spm.ours.token_to_id
    if not spm.flags.get("add_space_prefix", True):
        no_prefix = [ids("he"), ids("llo"), ids("▁world")]
        assert ours.encode("hello world", add_special_tokens=False) == no_prefix
        return
    # " world" gets the dummy "▁" too: "▁▁world".
    assert ours.encode(" world", add_special_tokens=False) == [ids("▁"), ids("▁world")]
    assert spm.ref.encode(" world", add_special_tokens=False) == [ids("▁world")]
    # Text after a special token starts a new stretch, with its own "▁".
    assert ours.encode("hello</s>world", add_special_tokens=False) == [
        ids("▁hello"), 2, ids("▁world"),
    ]  # fmt: skip
    assert ours.decode(ours.encode(" world")) == " world"


def test_sentencepiece_bos_byte_fallback_and_merges(spm: Spm) -> None:
    ours, root = spm.ours, spm.root
    config = json.loads((root / "tokenizer_config.json").read_text())
    add_bos = config["add_bos_token"]
    assert add_bos is spm.flags.get("add_bos", True)  # llama.cpp's default for SentencePiece
    ids = ours.encode("hello world")
    assert (ids[0] == 1) is add_bos
    assert ids[1 if add_bos else 0 :] == ours.encode("hello world", add_special_tokens=False)
    # Merges recovered from the scores join whole words.
    body = ours.encode("the world", add_special_tokens=False)
    assert body[-1] == ours.token_to_id("▁world")
    # "é" is two bytes, each its own <0xNN> token, and decodes back to "é".
    body = ours.encode("é", add_special_tokens=False)
    assert ours.token_to_id("<0xC3>") in body and ours.token_to_id("<0xA9>") in body
    assert ours.decode(body) == "é"
    assert ours.eos_token_id == 2 and ours.stop_token_ids == frozenset({2})
    assert "chat_template" not in config  # the file has none


def test_sentencepiece_output_loads_in_transformers(spm: Spm) -> None:
    # The files are ordinary Hugging Face files: transformers reads them back the same way.
    back = transformers.AutoTokenizer.from_pretrained(str(spm.root))
    for text in SPM_SAMPLES:
        assert back.encode(text) == spm.ours.encode(text)
        assert back.decode(back.encode(text), skip_special_tokens=True) == spm.ours.decode(
            spm.ours.encode(text)
        )


def test_merges_from_scores_rank_by_joined_score() -> None:
    tokens = ["<s>", "a", "b", "c", "ab", "bc", "abc", "<0x61>"]
    scores = [0.0, -10, -11, -12, -2.0, -1.0, -3.0, 0.0]
    types = [3, 1, 1, 1, 1, 1, 1, 6]
    assert merges_from_scores(tokens, scores, types) == [
        ("b", "c"),  # "bc" scores -1
        ("a", "b"),  # "ab" -2
        ("a", "bc"),  # "abc" -3, both cuts
        ("ab", "c"),
    ]


# --- a byte-level GGUF with the Llama 3 pre-tokenizer -------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe_gguf(path: pathlib.Path) -> pathlib.Path:
    alphabet = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3"]
    merges += ["Ċ Ċ", "Ġ Ġ", "i n", "in g"]
    merged = ["Ġt", "he", "Ġthe", "Ġw", "or", "Ġwor", "ld", "Ġworld", "12", "123", "ĊĊ"]
    merged += ["ĠĠ", "in", "ing"]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tokens = [*alphabet, *merged, *specials, "<think>"]
    types = [1] * (len(alphabet) + len(merged)) + [3, 3, 3, 4]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|end_of_text|>"))
    w.add_eot_token_id(tokens.index("<|eot_id|>"))
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any, dict[str, Any]]:
    root = tmp_path_factory.mktemp("bpe")
    path = _bpe_gguf(root / "bpe.gguf")
    metadata = read_header(path).metadata
    return _load(metadata, root / "model"), _reference(path), metadata


@pytest.mark.parametrize(
    "text",
    [
        "the world",
        " the world's 1234567 thing",
        "a\n\n\nb  c   d",
        "<think>the</think> <|eot_id|>",
        "ÀÉÎ 😀 the",
        "",
    ],
)
def test_byte_level_llama3_matches_transformers(
    bpe: tuple[Tokenizer, Any, dict[str, Any]], text: str
) -> None:
    ours, ref, _ = bpe
    assert ours.encode(text) == ref.encode(text)
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == ref.decode(ref.encode(text))


def test_byte_level_bos_stops_and_template(bpe: tuple[Tokenizer, Any, dict[str, Any]]) -> None:
    ours, _, metadata = bpe
    bos = ours.token_to_id("<|begin_of_text|>")
    assert ours.encode("the")[0] == bos
    assert ours.encode("123 the", add_special_tokens=False) == [
        ours.token_to_id("123"),
        ours.token_to_id("Ġthe"),
    ]
    eos, eot = ours.token_to_id("<|end_of_text|>"), ours.token_to_id("<|eot_id|>")
    assert ours.stop_token_ids == frozenset({eos, eot})
    generation = json.loads(tokenizer_files(metadata)["generation_config.json"])
    assert generation == {"bos_token_id": bos, "eos_token_id": [eos, eot]}
    # The template writes BOS itself, so encode_chat adds no second one.
    chat = ours.encode_chat([{"role": "user", "content": "the"}])
    assert chat == [bos, ours.token_to_id("t"), ours.token_to_id("he")]
    # <think> is matched whole but is text, so decoding keeps it.
    assert ours.decode(ours.encode("<think>")) == "<think>"


# --- bad metadata ------------------------------------------------------------------------------


def _spm_metadata() -> dict[str, Any]:
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "▁a"]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -5.0, -6.0, -1.0],
        "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def test_minimal_metadata_works(tmp_path: pathlib.Path) -> None:
    tok = _load(_spm_metadata(), tmp_path / "m")
    assert tok.encode("a a") == [1, 5, 5]
    assert tok.decode([1, 5, 5]) == "a a"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.tokens": None}, r"no tokenizer\.ggml\.tokens"),
        ({"tokenizer.ggml.tokens": []}, r"no tokenizer\.ggml\.tokens"),
        ({"tokenizer.ggml.tokens": "abc"}, r"tokenizer\.ggml\.tokens must be a list of strings"),
        ({"tokenizer.ggml.model": "rwkv"}, r"tokenizer\.ggml\.model 'rwkv' is not supported"),
        ({"tokenizer.ggml.model": None}, r"tokenizer\.ggml\.model None is not supported"),
        (
            {"tokenizer.ggml.token_type": [2, 3, 3, 1]},
            r"tokenizer\.ggml\.token_type has 4 entries but tokenizer\.ggml\.tokens has 6",
        ),
        (
            {"tokenizer.ggml.scores": [0.0] * 7},
            r"tokenizer\.ggml\.scores has 7 entries but tokenizer\.ggml\.tokens has 6",
        ),
        (
            {"tokenizer.ggml.scores": None},
            r"needs tokenizer\.ggml\.scores or tokenizer\.ggml\.merges",
        ),
        (
            {"tokenizer.ggml.bos_token_id": 6},
            r"ggml\.bos_token_id is 6, outside the vocabulary of 6 tokens \(ids 0\.\.5\)",
        ),
        ({"tokenizer.ggml.eos_token_id": -1}, r"eos_token_id is -1, outside the vocabulary"),
        ({"tokenizer.ggml.padding_token_id": "1"}, r"padding_token_id must be a token id"),
        ({"tokenizer.ggml.eot_token_id": True}, r"eot_token_id must be a token id"),
        ({"tokenizer.ggml.add_bos_token": 1}, r"add_bos_token must be true or false"),
        ({"tokenizer.ggml.merges": ["▁ a", "aa"]}, r"merges\[1\] is 'aa'; a merge must be two"),
        ({"tokenizer.ggml.merges": ["▁ b"]}, r"merges\[0\] '▁ b' uses 'b', which is not in"),
    ],
)
def test_bad_metadata(change: dict[str, Any], message: str) -> None:
    metadata = _spm_metadata()
    for key, value in change.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    with pytest.raises(GGUFTokenizerError, match=message):
        tokenizer_files(metadata)


def test_unsupported_model_names_the_supported_ones() -> None:
    metadata = {**_spm_metadata(), "tokenizer.ggml.model": "rwkv"}
    with pytest.raises(GGUFTokenizerError) as info:
        tokenizer_files(metadata)
    assert all(name in str(info.value) for name in SUPPORTED_MODELS)
    assert isinstance(info.value, ValueError)


def test_unknown_pre_tokenizer_is_refused() -> None:
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "deepseek-llm",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
    }
    with pytest.raises(GGUFTokenizerError, match=r"pre 'deepseek-llm' is not supported.*qwen2"):
        tokenizer_files(metadata)
    del metadata["tokenizer.ggml.pre"]
    del metadata["tokenizer.ggml.merges"]
    with pytest.raises(GGUFTokenizerError, match=r"merges is missing"):
        tokenizer_files(metadata)


def test_add_bos_without_a_bos_id() -> None:
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.add_bos_token": True,
    }
    with pytest.raises(GGUFTokenizerError, match=r"add_bos_token is true but .*bos_token_id"):
        tokenizer_files(metadata)


def test_no_chat_template(tmp_path: pathlib.Path) -> None:
    files = tokenizer_files(_spm_metadata())
    assert "chat_template" not in json.loads(files["tokenizer_config.json"])
    tok = _load(_spm_metadata(), tmp_path / "m")
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
