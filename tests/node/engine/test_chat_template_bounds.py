"""The bounded sandbox (node/engine/chat_template.py): real templates render exactly as in
transformers' plain sandbox, oversized operations are refused before they run, the output is
counted, and the renderer process's frames and request handling."""

from __future__ import annotations

import io
import os
import pathlib
import resource
import signal
import subprocess
import sys
from collections import OrderedDict
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import pytest

from node.engine.chat_template import (
    MAX_FRAME_BYTES,
    TemplateBudgetError,
    TemplateRenderError,
    _serve_one,
    compile_chat_template,
    read_frame,
    render_chat,
    write_frame,
)
from node.testing.tinymodel import LLAMA_CHAT_TEMPLATE, QWEN2_CHAT_TEMPLATE

ROOT = pathlib.Path(__file__).resolve().parents[3]
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CHAT: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "¿Qué tal? 🎉 " * 3},
        {"role": "assistant", "content": "Bien."},
        {"role": "user", "content": "Count to 3."},
    ],
    "add_generation_prompt": True,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "tools": None,
    "documents": None,
}


def _plain_sandbox(source: str) -> jinja2.Template:
    """transformers' environment, without the bounds."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    return env.from_string(source)


@pytest.mark.parametrize("source", [SMOLLM2_TEMPLATE, QWEN2_CHAT_TEMPLATE, LLAMA_CHAT_TEMPLATE])
@pytest.mark.parametrize("gen", [True, False])
def test_real_templates_render_as_before(source: str, gen: bool) -> None:
    variables = {**CHAT, "add_generation_prompt": gen}
    expected = _plain_sandbox(source).render(**variables)
    assert render_chat(compile_chat_template(source), variables, max_output=10_000) == expected
    assert render_chat(compile_chat_template(source), variables) == expected


def test_huge_repetition_is_refused_before_it_allocates() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for source in ("{{ 'x' * 10**9 }}", "{{ 10**9 * 'x' }}", "{{ [1] * 10**9 }}"):
        with pytest.raises(TemplateBudgetError, match="repeats a sequence into 1000000000 items"):
            render_chat(compile_chat_template(source), {})
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("{{ 7 ** (10**8) }}", "raises an integer past"),
        ("{% set n = 10**4000 %}{{ n * n * n * n * n }}", "multiplies integers past"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
            "{% endfor %}",
            "joins two sequences",
        ),
        ("{{ range(10**6) | list }}", "size limit: Range too big"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
        ("{% for i in range(1000) %}{{ 'y' * 100 }}{% endfor %}", "wrote more than 50000 characters"),
    ],
)
def test_bounds_refuse_with_a_reason(source: str, match: str) -> None:
    with pytest.raises(TemplateBudgetError, match=match):
        render_chat(compile_chat_template(source), {}, max_output=50_000)


def test_small_operations_still_work() -> None:
    t = compile_chat_template("{{ '-' * 3 }}{{ 2 ** 10 }}{{ [1] + [2] }}{{ 3 * 4 }}{{ 1.5 * 2 }}")
    assert render_chat(t, {}) == "---1024[1, 2]123.0"


def test_template_errors_keep_their_messages() -> None:
    with pytest.raises(TemplateRenderError, match="syntax error at line 1"):
        compile_chat_template("{% for %}")
    t = compile_chat_template("{{ raise_exception('no tools here') }}")
    with pytest.raises(TemplateRenderError, match="chat template refused the messages: no tools here"):
        render_chat(t, {})
    with pytest.raises(TemplateRenderError, match="failed on these messages: TypeError"):
        render_chat(compile_chat_template("{{ 'a' + 1 }}"), {})


def test_frames_round_trip_and_size_is_checked_first() -> None:
    buf = io.BytesIO()
    write_frame(buf, {"text": "héllo \ud800 🎉"})
    write_frame(buf, [1, 2])
    buf.seek(0)
    assert read_frame(buf) == {"text": "héllo \ud800 🎉"}
    assert read_frame(buf) == [1, 2]
    assert read_frame(buf) is None
    with pytest.raises(ValueError, match="over the 10-byte limit"):
        read_frame(io.BytesIO((MAX_FRAME_BYTES).to_bytes(4, "big") + b"{}"), max_bytes=10)


def _no_limit(seconds: float) -> None:
    """The renderer process caps its CPU time per render; this test process must not."""


def test_serve_one_answers_text_error_or_budget() -> None:
    compiled: OrderedDict[str, Any] = OrderedDict()
    request = {"template": SMOLLM2_TEMPLATE, "variables": CHAT, "max_output": 10_000, "seconds": 5.0}
    assert _serve_one(request, compiled, _no_limit) == {"text": _plain_sandbox(SMOLLM2_TEMPLATE).render(**CHAT)}
    assert len(compiled) == 1
    assert _serve_one({**request, "template": "{{ 'x' * 10**9 }}"}, compiled, _no_limit)["budget"].startswith(
        "the template repeats"
    )
    assert "syntax error" in _serve_one({**request, "template": "{% if %}"}, compiled, _no_limit)["error"]
    assert _serve_one({"template": 1}, compiled, _no_limit)["error"].startswith("bad render request")


def test_renderer_process_stops_itself_at_its_cpu_budget() -> None:
    """If nobody kills a runaway render (its parent hung or died), the kernel does: SIGXCPU
    once the render used its seconds of CPU. Normal renders before it are served."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.engine.chat_template", str(os.getpid()), str(128 * 2**20)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert "ready" in read_frame(proc.stdout)
        request = {"template": SMOLLM2_TEMPLATE, "variables": CHAT, "max_output": 10_000, "seconds": 1.0}
        write_frame(proc.stdin, request)
        assert read_frame(proc.stdout) == {"text": _plain_sandbox(SMOLLM2_TEMPLATE).render(**CHAT)}
        loops = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
        write_frame(proc.stdin, {**request, "template": loops})
        assert proc.wait(timeout=60) == -signal.SIGXCPU
        assert read_frame(proc.stdout) is None
    finally:
        proc.kill()
        proc.wait()
