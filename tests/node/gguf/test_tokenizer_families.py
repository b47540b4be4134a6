"""The tokenizers of the new families, from GGUF metadata as llama.cpp's converter writes it,
encode mixed multilingual text with digits, emoji and code exactly as Hugging Face's own
tokenizer does: Qwen3 (Qwen2's byte-level BPE, pre ``qwen2``), Gemma 3 (a SentencePiece
vocabulary with byte fallback, model ``llama``, no space prefix) and Phi-4-mini (byte-level
BPE, pre ``gpt-4o``). Each tokenizer is trained tiny here with the family's real settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.engine.tokenizer import Tokenizer
from node.gguf.files import read_header
from node.gguf.tokenizer import _GPT4O_SPLIT, _QWEN2_SPLIT, tokenizer_files
from node.testing.gguf_writer import DEFAULT_PRE, _tokenizer
from tests.helpers.tiny_archs import MIXED, _save_byte_level, byte_level_tokenizer, gemma_tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TEXTS = [
    *MIXED,
    "¿Cuánto es dos más dos? 2+2=4, 1000000 veces. Ελληνικά, العربية, हिन्दी",
    "<|im_start|>user\nhi 👋🏽<|im_end|>\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "x²³ ½ cup, ①②, ＡＢＣ full-width, tabs\t\tand\n\n\nnewlines",
    "",
]


def _family(name: str, root: Path) -> Path:
    root.mkdir(parents=True)
    if name == "gemma3":
        gemma_tokenizer(root)
    elif name == "qwen3":
        tok = byte_level_tokenizer(_QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], nfc=True)
        _save_byte_level(tok, root, None, "<|im_end|>", "<|endoftext|>")
    else:
        tok = byte_level_tokenizer(_GPT4O_SPLIT, ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"])
        _save_byte_level(tok, root, "<|endoftext|>", "<|end|>", "<|endoftext|>")
    return root


def _gguf(arch: str, root: Path, path: Path) -> dict[str, Any]:
    """Only what the converter writes for the tokenizer (and a token table to make it a file)."""
    ref = transformers.AutoTokenizer.from_pretrained(str(root))
    n = len(ref)
    w = gguf.GGUFWriter(str(path), arch)
    _tokenizer(w, arch, {"vocab_size": n}, root, None, True)
    w.add_tensor("token_embd.weight", np.zeros((n, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dict(read_header(path).metadata)


@pytest.fixture(scope="module", params=["qwen3", "gemma3", "phi3"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Tokenizer, Any, dict[str, Any]]:
    arch = request.param
    base = tmp_path_factory.mktemp(arch)
    root = _family(arch, base / "hf")
    md = _gguf(arch, root, base / "t.gguf")
    out = base / "ours"
    out.mkdir()
    for name, data in tokenizer_files(md).items():
        (out / name).write_bytes(data)
    return arch, Tokenizer.from_model_dir(out), transformers.AutoTokenizer.from_pretrained(str(root)), md


def test_the_metadata_is_the_converters(family: tuple[str, Tokenizer, Any, dict[str, Any]]) -> None:
    arch, _, _, md = family
    if arch == "gemma3":
        assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_space_prefix"] is False
        assert "tokenizer.ggml.merges" not in md and md["tokenizer.ggml.token_type"][3 + 5] == 6  # <0x03>
    else:
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == DEFAULT_PRE[arch]


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_like_hugging_face(family: tuple[str, Tokenizer, Any, dict[str, Any]], text: str) -> None:
    arch, ours, ref, _ = family
    want = ref.encode(text)
    assert ours.encode(text) == want
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.decode(want, skip_special_tokens=False) == ref.decode(want)
    if arch == "gemma3":
        assert want[:1] == [2]  # <bos>, as Gemma's tokenizer adds
        parrot = ours.encode("🦜", add_special_tokens=False)  # in no piece: byte fallback
        assert ref.convert_ids_to_tokens(parrot) == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]
