"""Chat templates: node.engine.tokenizer must render exactly the text transformers'
apply_chat_template(tokenize=False) renders, and encode_chat must tokenize it like the
`tokenizers` library without doubling BOS. Template errors become TokenizerError."""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer

from node.engine.tokenizer import Tokenizer, TokenizerError, compile_chat_template
from node.testing.tinymodel import make_tiny_model
from tests.helpers.chat_templates import LLAMA3_TEMPLATE, QWEN2_TEMPLATE

transformers = pytest.importorskip("transformers")

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user_only": [{"role": "user", "content": "Hello!"}],
    "system_user": [
        {"role": "system", "content": "  You answer in one sentence.  "},
        {"role": "user", "content": "¿Qué es un río? 🌊"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4.\n"},
        {"role": "user", "content": "  And 3 + 3?\n\n"},
    ],
    "assistant_last": [
        {"role": "user", "content": "Say <b>hi</b> & bye"},
        {"role": "assistant", "content": "hi & bye"},
    ],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": 'Weather for a city, e.g. <Zürich> & "Kraków"',
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,  # OpenAI clients send this; transformers drops None-valued keys
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich <CH>"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp_c": 21}'},
    {"role": "tool", "content": '{"wind": "5 km/h"}'},
]


def _hf_tokenizer(tokenizer_json: pathlib.Path, specials: dict[str, str]) -> Any:
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **specials)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    base = tmp_path_factory.mktemp("chat")
    return {arch: make_tiny_model(base / arch, arch=arch, layers=1) for arch in ("llama", "qwen2")}


# --- the tiny models' own templates --------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_tiny_model_template_matches_transformers(
    model_dirs: dict[str, pathlib.Path], arch: str, conv: str, gen: bool
) -> None:
    path = model_dirs[arch]
    ours = Tokenizer.from_model_dir(path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    messages = CONVERSATIONS[conv]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_encode_chat_matches_tokenizers_and_has_one_bos(
    model_dirs: dict[str, pathlib.Path], arch: str
) -> None:
    path = model_dirs[arch]
    ours = Tokenizer.from_model_dir(path)
    ref = HFTokenizer.from_file(str(path / "tokenizer.json"))
    messages = CONVERSATIONS["multi_turn"]
    text = ours.apply_chat_template(messages)
    ids = ours.encode_chat(messages)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    if arch == "llama":
        bos = ours.bos_token_id
        assert bos is not None
        assert ids[0] == bos and ids.count(bos) == 1
        # The prompt ends with "<|start_header_id|>assistant<|end_header_id|>\n\n".
        tail = [
            ours.token_to_id("<|start_header_id|>"),
            *ours.encode("assistant", add_special_tokens=False),
            ours.token_to_id("<|end_header_id|>"),
            *ours.encode("\n\n", add_special_tokens=False),
        ]
        assert ids[-len(tail) :] == tail
    else:
        im_start = ours.token_to_id("<|im_start|>")
        assert im_start is not None
        assert ids.count(im_start) == 5  # system + 3 turns + generation prompt
        assert ids[0] == im_start


# --- Llama-3-style and Qwen2-style templates written here ----------------------------------------


def _pair(model_dirs: dict[str, pathlib.Path], arch: str, template: str) -> tuple[Tokenizer, Any]:
    path = model_dirs[arch]
    if arch == "llama":
        specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    else:
        specials = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    ours = Tokenizer(
        HFTokenizer.from_file(str(path / "tokenizer.json")),
        tokenizer_config=dict(specials),
        chat_template=template,
    )
    return ours, _hf_tokenizer(path / "tokenizer.json", specials)


@pytest.mark.parametrize(
    ("arch", "template"), [("llama", LLAMA3_TEMPLATE), ("qwen2", QWEN2_TEMPLATE)]
)
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_real_style_templates_match_transformers(
    model_dirs: dict[str, pathlib.Path], arch: str, template: str, conv: str, gen: bool
) -> None:
    ours, hf = _pair(model_dirs, arch, template)
    messages = CONVERSATIONS[conv]
    expected = hf.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=gen
    )
    assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected


@pytest.mark.parametrize(
    ("arch", "template"), [("llama", LLAMA3_TEMPLATE), ("qwen2", QWEN2_TEMPLATE)]
)
def test_tools_and_tojson_match_transformers(
    model_dirs: dict[str, pathlib.Path], arch: str, template: str
) -> None:
    ours, hf = _pair(model_dirs, arch, template)
    messages = TOOL_CONVERSATION if arch == "qwen2" else TOOL_CONVERSATION[:1]
    expected = hf.apply_chat_template(
        messages,
        chat_template=template,
        tools=[WEATHER_TOOL],
        tokenize=False,
        add_generation_prompt=True,
    )
    got = ours.apply_chat_template(messages, tools=[WEATHER_TOOL])
    assert got == expected
    # transformers' tojson does not HTML-escape (Jinja's built-in one would write \u003c).
    assert "<Zürich>" in got


def test_date_string_override_reaches_template(model_dirs: dict[str, pathlib.Path]) -> None:
    ours, hf = _pair(model_dirs, "llama", LLAMA3_TEMPLATE)
    msgs = CONVERSATIONS["user_only"]
    got = ours.apply_chat_template(msgs, date_string="01 Jan 2030")
    assert "Today Date: 01 Jan 2030" in got
    assert got == hf.apply_chat_template(
        msgs,
        chat_template=LLAMA3_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
        date_string="01 Jan 2030",
    )


# --- where templates come from -------------------------------------------------------------------


def test_chat_template_jinja_file_is_used_when_config_has_none(
    model_dirs: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    src = model_dirs["qwen2"]
    d = tmp_path / "m"
    d.mkdir()
    for name in ("tokenizer.json", "config.json", "generation_config.json"):
        (d / name).write_bytes((src / name).read_bytes())
    tcfg = json.loads((src / "tokenizer_config.json").read_text())
    del tcfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (d / "chat_template.jinja").write_text(QWEN2_TEMPLATE)
    ours = Tokenizer.from_model_dir(d)
    msgs = CONVERSATIONS["user_only"]
    assert ours.apply_chat_template(msgs).startswith("<|im_start|>system\nYou are Qwen")
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )


def test_named_template_list_uses_default(model_dirs: dict[str, pathlib.Path]) -> None:
    path = model_dirs["llama"]
    ours = Tokenizer(
        HFTokenizer.from_file(str(path / "tokenizer.json")),
        tokenizer_config={
            "bos_token": {"content": "<|begin_of_text|>", "special": True},
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
            ],
        },
    )
    assert ours.apply_chat_template([{"role": "user", "content": "x"}]) == "<|begin_of_text|>x"


def test_strftime_now_and_loopcontrols(model_dirs: dict[str, pathlib.Path]) -> None:
    before = datetime.datetime.now().strftime("%Y-%m-%d")
    ours = Tokenizer(
        HFTokenizer.from_file(str(model_dirs["llama"] / "tokenizer.json")),
        chat_template=(
            "{{ strftime_now('%Y-%m-%d') }}|{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
            "{{ m.content }}{% endfor %}"
        ),
    )
    after = datetime.datetime.now().strftime("%Y-%m-%d")
    out = ours.apply_chat_template([{"role": "user", "content": c} for c in "abcd"])
    assert out in (f"{before}|ab", f"{after}|ab")


# --- errors --------------------------------------------------------------------------------------


def _with_template(model_dirs: dict[str, pathlib.Path], template: str | None) -> Tokenizer:
    return Tokenizer(
        HFTokenizer.from_file(str(model_dirs["llama"] / "tokenizer.json")),
        tokenizer_config={"bos_token": "<|begin_of_text|>"},
        chat_template=template,
    )


def test_unknown_role_raises_clear_error(model_dirs: dict[str, pathlib.Path]) -> None:
    tok = Tokenizer.from_model_dir(model_dirs["llama"])
    with pytest.raises(
        TokenizerError, match="chat template refused the messages: Unknown role robot"
    ):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_template_syntax_error(model_dirs: dict[str, pathlib.Path]) -> None:
    tok = _with_template(model_dirs, "{% for m in messages %}{{ m.content }")
    with pytest.raises(TokenizerError, match="chat template has a syntax error at line 1"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_runtime_type_error(model_dirs: dict[str, pathlib.Path]) -> None:
    tok = _with_template(model_dirs, "{{ messages[0]['content'] + 1 }}")
    with pytest.raises(TokenizerError, match="chat template failed on these messages: TypeError"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_sandbox_blocks_attribute_escape(model_dirs: dict[str, pathlib.Path]) -> None:
    tok = _with_template(model_dirs, "{{ messages.__class__.__mro__ }}{{ ''.__class__.mro() }}")
    with pytest.raises(TokenizerError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_template(model_dirs: dict[str, pathlib.Path]) -> None:
    tok = _with_template(model_dirs, None)
    with pytest.raises(TokenizerError, match="has no chat template"):
        tok.encode_chat([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "messages must be a list"),
        (["hello"], "message 0 must be an object with 'role' and 'content'"),
        ([{"content": "no role"}], "message 0 has no 'role' string"),
    ],
)
def test_bad_messages(model_dirs: dict[str, pathlib.Path], messages: Any, message: str) -> None:
    tok = Tokenizer.from_model_dir(model_dirs["qwen2"])
    with pytest.raises(TokenizerError, match=message):
        tok.apply_chat_template(messages)


def test_template_must_be_text(model_dirs: dict[str, pathlib.Path]) -> None:
    with pytest.raises(TokenizerError, match="chat_template must be a string, got int"):
        Tokenizer(
            HFTokenizer.from_file(str(model_dirs["qwen2"] / "tokenizer.json")), {"chat_template": 5}
        )


def test_compile_is_sandboxed_and_has_helpers() -> None:
    t = compile_chat_template("{{ {'a': '<x>'} | tojson }}")
    assert t.render() == '{"a": "<x>"}'
