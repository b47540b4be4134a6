"""Tests for node.engine.tokenizer: encode/decode against the `tokenizers` library, special and
stop tokens, the streaming decoder, and clear errors for broken model directories."""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from node.engine.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError
from node.testing.tinymodel import make_tiny_model

TEXTS = [
    "Hello, world!",
    "¿Qué tal? Muy bien, gracias. Añade más café.",
    "emoji 😀👍🎉 and flags 🇪🇸 and a family 👨‍👩‍👧",
    "naïve façade, Zürich, Łódź, Øresund — “quotes” …",
    "日本語のテキスト、中文文本、Русский текст",
    "def f(x):\n    return x ** 2  # square\n\n\ttab",
    "   leading and trailing spaces   ",
    "",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("tok") / "llama", arch="llama", layers=1)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("tok") / "qwen2", arch="qwen2", layers=1)


@pytest.fixture(scope="module")
def llama(llama_dir: pathlib.Path) -> Tokenizer:
    return Tokenizer.from_model_dir(llama_dir)


@pytest.fixture(scope="module")
def qwen(qwen_dir: pathlib.Path) -> Tokenizer:
    return Tokenizer.from_model_dir(qwen_dir)


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: pathlib.Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


_DELETE = object()


# --- encode / decode ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_tokenizers_library(
    llama_dir: pathlib.Path, llama: Tokenizer, text: str
) -> None:
    ref = HFTokenizer.from_file(str(llama_dir / "tokenizer.json"))
    assert llama.encode(text) == ref.encode(text).ids
    assert (
        llama.encode(text, add_special_tokens=False)
        == ref.encode(text, add_special_tokens=False).ids
    )
    assert llama.decode(llama.encode(text)) == text


def test_long_text_encodes_the_same_without_holding_the_gil(
    llama_dir: pathlib.Path, llama: Tokenizer
) -> None:
    """Past 16 KiB encode goes through encode_batch (which lets go of the GIL): same ids."""
    ref = HFTokenizer.from_file(str(llama_dir / "tokenizer.json"))
    text = "¿Sí? the world's 1234567 thing 🎉\n" * 2000
    assert len(text) > 16 * 2**10
    for special in (True, False):
        assert llama.encode(text, special) == ref.encode(text, add_special_tokens=special).ids


def test_bos_added_only_where_the_model_uses_one(llama: Tokenizer, qwen: Tokenizer) -> None:
    assert llama.bos_token_id == llama.token_to_id("<|begin_of_text|>")
    ids = llama.encode("hi there")
    assert ids[0] == llama.bos_token_id and ids[1:] == llama.encode(
        "hi there", add_special_tokens=False
    )
    # Qwen2 has no BOS: tokenizer_config says bos_token null even though config.json has an id.
    assert qwen.bos_token_id is None
    assert qwen.encode("hi there") == qwen.encode("hi there", add_special_tokens=False)


def test_decode_skips_special_tokens_on_request(llama: Tokenizer) -> None:
    ids = llama.encode(
        "<|start_header_id|>user<|end_header_id|>hello<|eot_id|>", add_special_tokens=True
    )
    assert llama.decode(ids) == "userhello"
    assert llama.decode(ids, skip_special_tokens=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>hello<|eot_id|>"
    )


def test_vocab_size(llama: Tokenizer) -> None:
    assert llama.vocab_size == 512


def test_decode_rejects_ids_outside_vocab(llama: Tokenizer) -> None:
    with pytest.raises(
        TokenizerError, match=r"token id 512 is outside the vocabulary \(0\.\.511\)"
    ):
        llama.decode([1, 512])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        llama.decode([-1])


def test_encode_rejects_non_text(llama: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="can only encode text"):
        llama.encode(b"bytes")  # type: ignore[arg-type]


# --- stop tokens ---------------------------------------------------------------------------------


def test_stop_tokens_from_generation_config_list_and_eos(llama: Tokenizer) -> None:
    eot = llama.token_to_id("<|eot_id|>")
    end = llama.token_to_id("<|end_of_text|>")
    assert llama.eos_token_id == eot
    assert llama.stop_token_ids == frozenset({eot, end})


def test_stop_tokens_from_generation_config_int(
    llama_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    d = _copy(llama_dir, tmp_path / "m")
    _edit_json(d / "generation_config.json", eos_token_id=3)
    tok = Tokenizer.from_model_dir(d)
    assert tok.stop_token_ids == frozenset({3, tok.token_to_id("<|eot_id|>")})


def test_stop_tokens_without_generation_config(
    llama_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    d = _copy(llama_dir, tmp_path / "m")
    (d / "generation_config.json").unlink()
    _edit_json(d / "config.json", eos_token_id=5)
    tok = Tokenizer.from_model_dir(d)
    assert tok.stop_token_ids == frozenset({5, tok.token_to_id("<|eot_id|>")})
    _edit_json(d / "config.json", eos_token_id=None)
    tok = Tokenizer.from_model_dir(d)
    assert tok.stop_token_ids == frozenset({tok.token_to_id("<|eot_id|>")})


def test_eos_as_added_token_dict(llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    d = _copy(llama_dir, tmp_path / "m")
    _edit_json(
        d / "tokenizer_config.json",
        eos_token={
            "content": "<|end_of_text|>",
            "lstrip": False,
            "rstrip": False,
            "__type": "AddedToken",
        },
    )
    (d / "generation_config.json").unlink()
    _edit_json(d / "config.json", eos_token_id=_DELETE)
    tok = Tokenizer.from_model_dir(d)
    assert tok.eos_token_id == tok.token_to_id("<|end_of_text|>")
    assert tok.stop_token_ids == frozenset({tok.eos_token_id})


def test_eos_falls_back_to_config_json_when_nothing_else(
    llama_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    d = _copy(llama_dir, tmp_path / "m")
    _edit_json(d / "tokenizer_config.json", eos_token=_DELETE, bos_token=_DELETE)
    (d / "generation_config.json").unlink()
    _edit_json(d / "config.json", eos_token_id=[7, 9], bos_token_id=4)
    tok = Tokenizer.from_model_dir(d)
    assert tok.stop_token_ids == frozenset({7, 9})
    assert tok.eos_token_id == 7
    assert tok.bos_token_id == 4


def test_qwen_stop_tokens(qwen: Tokenizer) -> None:
    assert qwen.eos_token_id == qwen.token_to_id("<|im_end|>")
    assert qwen.stop_token_ids == frozenset(
        {qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")}
    )


# --- incremental decoding ------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> tuple[list[str], str]:
    dec = tok.incremental_decoder(skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_matches_full_decode(llama: Tokenizer, text: str) -> None:
    ids = llama.encode(text, add_special_tokens=False)
    pieces, tail = _stream(llama, ids)
    assert "".join(pieces) + tail == llama.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert tail == ""


def test_multibyte_characters_really_split_across_tokens(llama: Tokenizer) -> None:
    # Guards the test above: if no emoji were split, holding back would never be exercised.
    ids = llama.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    assert llama.decode(ids[:1]).endswith("\ufffd")
    pieces, tail = _stream(llama, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "😀" and tail == ""


def test_incremental_with_special_tokens_kept_and_skipped(llama: Tokenizer) -> None:
    ids = llama.encode_chat([{"role": "user", "content": "¿Sí? 🎉"}])
    for skip in (True, False):
        pieces, tail = _stream(llama, ids, skip)
        assert "".join(pieces) + tail == llama.decode(ids, skip_special_tokens=skip)


def test_flush_returns_incomplete_tail_once(llama: Tokenizer) -> None:
    ids = llama.encode("ok 😀", add_special_tokens=False)
    dec = llama.incremental_decoder()
    pieces = [dec.push(i) for i in ids[:-1]]  # stop in the middle of the emoji
    assert "".join(pieces) == "ok "
    tail = dec.flush()
    assert tail == llama.decode(ids[:-1])[len("ok ") :]
    assert tail.endswith("\ufffd")
    assert dec.flush() == ""


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=40))
def test_incremental_property_text(llama: Tokenizer, text: str) -> None:
    ids = llama.encode(text, add_special_tokens=False)
    pieces, tail = _stream(llama, ids)
    assert "".join(pieces) + tail == llama.decode(ids)
    # Python may hand us lone surrogates; only text that round-trips is checked for U+FFFD.
    if "\ufffd" not in text and llama.decode(ids) == text:
        assert all("\ufffd" not in p for p in pieces)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ids=st.lists(st.integers(min_value=0, max_value=511), max_size=30), skip=st.booleans())
def test_incremental_property_random_ids(llama: Tokenizer, ids: list[int], skip: bool) -> None:
    # Random ids make invalid UTF-8 too: the stream must still equal the one-shot decode,
    # and no push may end in U+FFFD (it would be an incomplete character).
    pieces, tail = _stream(llama, ids, skip)
    assert "".join(pieces) + tail == llama.decode(ids, skip_special_tokens=skip)
    assert all(not p.endswith("\ufffd") for p in pieces)


def test_incremental_decoder_is_a_plain_class(llama: Tokenizer) -> None:
    assert isinstance(llama.incremental_decoder(), IncrementalDecoder)


# --- broken model directories --------------------------------------------------------------------


def test_missing_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_model_dir(tmp_path / "nope")


def test_missing_tokenizer_json(llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    d = _copy(llama_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer\.json not found"):
        Tokenizer.from_model_dir(d)


def test_broken_tokenizer_json(llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    d = _copy(llama_dir, tmp_path / "m")
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=r"cannot load .*tokenizer\.json"):
        Tokenizer.from_model_dir(d)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "config.json"])
def test_broken_json_files(llama_dir: pathlib.Path, tmp_path: pathlib.Path, name: str) -> None:
    d = _copy(llama_dir, tmp_path / "m")
    (d / name).write_text("{not json")
    with pytest.raises(TokenizerError, match=rf"cannot read .*{name}.*fix or re-download"):
        Tokenizer.from_model_dir(d)


def test_json_that_is_not_an_object(llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    d = _copy(llama_dir, tmp_path / "m")
    (d / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="must hold a JSON object, found list"):
        Tokenizer.from_model_dir(d)


def test_special_token_not_in_vocab(llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    d = _copy(llama_dir, tmp_path / "m")
    _edit_json(d / "tokenizer_config.json", eos_token="<|nope|>")
    with pytest.raises(TokenizerError, match=r"eos_token '<\|nope\|>' is not in the vocabulary"):
        Tokenizer.from_model_dir(d)


@pytest.mark.parametrize("value", ["2", 1.5, True, [1, "x"]])
def test_bad_eos_ids_in_generation_config(
    llama_dir: pathlib.Path, tmp_path: pathlib.Path, value: Any
) -> None:
    d = _copy(llama_dir, tmp_path / "m")
    _edit_json(d / "generation_config.json", eos_token_id=value)
    with pytest.raises(
        TokenizerError, match="eos_token_id must be an integer or a list of integers"
    ):
        Tokenizer.from_model_dir(d)


def test_bad_special_token_type(llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    d = _copy(llama_dir, tmp_path / "m")
    _edit_json(d / "tokenizer_config.json", bos_token=42)
    with pytest.raises(
        TokenizerError, match="bos_token 42 must be a string or an object with a 'content' string"
    ):
        Tokenizer.from_model_dir(d)
