"""Text side of the engine: tokenizer, chat template rendering and streaming detokenization.

Owns `Tokenizer` (a Hugging Face tokenizer.json driven by the `tokenizers` library, with the
special tokens, stop tokens and chat template from tokenizer_config.json and
generation_config.json) and `IncrementalDecoder` (token ids in, text out, never a broken
UTF-8 character). Chat templates are rendered the way transformers renders them, so a prompt
built here is the prompt the model was trained on; the sandbox and its bounds are
node/engine/chat_template.py's (the API renders there, in a capped process, from
`chat_variables`). No JAX and no networking here.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jinja2
from tokenizers import Tokenizer as HFTokenizer

from node.engine import chat_template

__all__ = ["IncrementalDecoder", "Tokenizer", "TokenizerError"]

# The named special tokens transformers passes to every chat template.
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_HOLD_GIL_CHARS = 16 * 2**10


class TokenizerError(Exception):
    """A model's tokenizer files are missing or broken, or a chat cannot be rendered."""


def _read_json(path: pathlib.Path, *, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path} not found; a model directory needs this file")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}; fix or re-download the file") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _token_text(key: str, value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise TokenizerError(
        f"tokenizer_config.json {key} {value!r} must be a string or an object with a 'content' string"
    )


def _int_ids(value: Any, source: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, bool):
        raise TokenizerError(f"{source} must be an integer or a list of integers, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    raise TokenizerError(f"{source} must be an integer or a list of integers, got {value!r}")


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses (sandboxed, same helpers,
    sizes bounded: node/engine/chat_template.py)."""
    try:
        return chat_template.compile_chat_template(source)
    except chat_template.TemplateRenderError as exc:
        raise TokenizerError(str(exc)) from exc


def _plain_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise TokenizerError(
            f"messages must be a list of {{'role': ..., 'content': ...}} objects, got {type(messages).__name__}"
        )
    plain: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"message {i} must be an object with 'role' and 'content', got {message!r}"
            )
        if not isinstance(message.get("role"), str):
            raise TokenizerError(f"message {i} has no 'role' string: {dict(message)!r}")
        # Like transformers: a key set to None counts as absent (OpenAI clients send content=None).
        plain.append({k: v for k, v in message.items() if v is not None})
    return plain


class Tokenizer:
    """A model's tokenizer: encode/decode, special and stop tokens, chat template."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        model_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        source: str = "<memory>",
    ) -> None:
        self._tok = tokenizer
        self._source = source
        tcfg = dict(tokenizer_config or {})
        gcfg = dict(generation_config or {})
        mcfg = dict(model_config or {})

        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            text = _token_text(key, tcfg.get(key))
            if text is not None:
                self.special_tokens[key] = text

        # tokenizer_config's "bos_token": null means "this model has no BOS" (Qwen2), even when
        # config.json names a bos_token_id; only a config without the key falls back.
        self.bos_token_id: int | None = self._special_id("bos_token")
        if self.bos_token_id is None and "bos_token" not in tcfg:
            bos = _int_ids(gcfg.get("bos_token_id", mcfg.get("bos_token_id")), "bos_token_id")
            self.bos_token_id = bos[0] if bos else None
        self.eos_token_id: int | None = self._special_id("eos_token")
        gen_eos = _int_ids(gcfg.get("eos_token_id"), "generation_config.json eos_token_id")
        model_eos = _int_ids(mcfg.get("eos_token_id"), "config.json eos_token_id")
        if self.eos_token_id is None and "eos_token" not in tcfg:
            fallback = gen_eos or model_eos
            self.eos_token_id = fallback[0] if fallback else None
        # generation_config.json is what transformers' generate() stops on; old checkpoints
        # without it keep the list in config.json. The template's end-of-turn token always stops.
        stops = set(gen_eos or model_eos)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        self.stop_token_ids: frozenset[int] = frozenset(stops)
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

        template = chat_template if chat_template is not None else tcfg.get("chat_template")
        if isinstance(template, list):
            # Some models ship several named templates; "default" is the one chat uses.
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(
                f"{source}: chat_template must be a string, got {type(template).__name__}"
            )
        self.chat_template: str | None = template
        self._compiled: jinja2.Template | None = None

    def _special_id(self, key: str) -> int | None:
        text = self.special_tokens.get(key)
        if text is None:
            return None
        idx = self._tok.token_to_id(text)
        if idx is None:
            raise TokenizerError(
                f"{self._source}: {key} {text!r} is not in the vocabulary of tokenizer.json"
            )
        return int(idx)

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and generation_config.json from a model dir."""
        root = pathlib.Path(path)
        if not root.is_dir():
            raise TokenizerError(f"model directory {root} does not exist")
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise TokenizerError(
                f"{tok_path} not found; only fast tokenizers (tokenizer.json) are supported, "
                "convert the model's tokenizer with transformers' save_pretrained"
            )
        try:
            tok = HFTokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises plain Exception for every parse error
            raise TokenizerError(f"cannot load {tok_path}: {exc}") from exc
        tcfg = _read_json(root / "tokenizer_config.json", required=False)
        gcfg = _read_json(root / "generation_config.json", required=False)
        mcfg = _read_json(root / "config.json", required=False)
        template: str | None = None
        if not (tcfg and tcfg.get("chat_template")):
            jinja_path = root / "chat_template.jinja"
            if jinja_path.is_file():
                try:
                    template = jinja_path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise TokenizerError(f"cannot read {jinja_path}: {exc}") from exc
        return cls(tok, tcfg, gcfg, mcfg, chat_template=template, source=str(root))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds what the post-processor adds (e.g. BOS)."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode text (str), got {type(text).__name__}")
        if len(text) > _HOLD_GIL_CHARS:
            # encode_batch lets go of the GIL, so a long text in a thread leaves the others
            # (an event loop) running; encode holds it for the whole call (a second per MiB).
            return list(self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary raise TokenizerError."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (e.g. a special token's text), or None."""
        idx = self._tok.token_to_id(token)
        return None if idx is None else int(idx)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render `messages` with the model's chat template, as transformers does (tokenize=False).

        `extra` reaches the template as variables (e.g. tools=[...]), overriding special tokens.
        """
        if self.chat_template is None:
            raise TokenizerError(
                f"{self._source} has no chat template (tokenizer_config.json chat_template or "
                "chat_template.jinja); use raw prompts with this model"
            )
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        variables = self.chat_variables(messages, add_generation_prompt, **extra)
        try:
            return chat_template.render_chat(self._compiled, variables)
        except chat_template.TemplateRenderError as exc:
            raise TokenizerError(str(exc)) from exc

    def chat_variables(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> dict[str, Any]:
        """What the chat template sees for `messages`: the special tokens, `extra` over them,
        tools and documents (None unless given), messages and add_generation_prompt."""
        variables: dict[str, Any] = {**self.special_tokens, **extra}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        variables["messages"] = _plain_messages(messages)
        variables["add_generation_prompt"] = add_generation_prompt
        return variables

    def encode_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat; the template writes BOS itself, so none is added."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A fresh streaming decoder for one generation."""
        return IncrementalDecoder(self.decode, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text without broken characters.

    Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character; decoding
    such a prefix yields U+FFFD. The decoder re-decodes a small window that starts at the
    last point where the text was complete, and holds back output while the window ends in
    U+FFFD. The concatenation of every push() and flush() equals decoding all ids at once.
    """

    def __init__(self, decode: Callable[..., str], skip_special_tokens: bool = True) -> None:
        self._decode = decode
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # ids[_prefix:_read] were already emitted; ids[_prefix] starts at a character boundary.
        self._prefix = 0
        self._read = 0

    def _text(self, start: int, end: int) -> str:
        return self._decode(self._ids[start:end], skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        emitted = self._text(self._prefix, self._read)
        full = self._text(self._prefix, len(self._ids))
        if len(full) > len(emitted) and not full.endswith("\ufffd"):
            new = full[len(emitted) :]
            self._prefix, self._read = self._read, len(self._ids)
            return new
        return ""

    def flush(self) -> str:
        """Return what is still held back (an incomplete character stays as U+FFFD)."""
        emitted = self._text(self._prefix, self._read)
        full = self._text(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return full[len(emitted) :]
