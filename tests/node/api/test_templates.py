"""The template renderer (node/api/templates.py): a real renderer process renders normal
templates exactly as in this process, and refuses hostile ones within the budget, kills and
replaces an overrunning process, keeps the verdict per template, and never grows this
process's memory."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import time
from collections.abc import AsyncIterator

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from node.api.templates import Budget, RenderError, TemplateOverBudget, TemplateRenderer, Verdicts
from node.engine.chat_template import template_key
from node.engine.tokenizer import Tokenizer
from node.testing.tinymodel import QWEN2_CHAT_TEMPLATE

NESTED_LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
DOUBLING = ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}{{ ns.s | length }}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "¿Qué tal? 🎉"}]
# Generous for a loaded test machine; the refusals below come at the budget, not at this.
SLACK_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _tokenizer(template: str) -> Tokenizer:
    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(hf, {"eos_token": "[UNK]"}, chat_template=template)


@pytest.fixture
async def renderer() -> AsyncIterator[TemplateRenderer]:
    r = TemplateRenderer(Budget(seconds=0.5, memory_mib=128), clock=Clock())
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
async def patient() -> AsyncIterator[TemplateRenderer]:
    """A budget long enough that what the test does mid-render comes first."""
    r = TemplateRenderer(Budget(seconds=30.0, memory_mib=128))
    try:
        yield r
    finally:
        await r.close()


async def test_normal_template_renders_as_in_process(renderer: TemplateRenderer) -> None:
    tok = _tokenizer(QWEN2_CHAT_TEMPLATE)
    for think in (None, True):
        extra = {} if think is None else {"enable_thinking": think}
        got = await renderer.render("qwen", QWEN2_CHAT_TEMPLATE, tok.chat_variables(MESSAGES, **extra))
        assert got == tok.apply_chat_template(MESSAGES, **extra)
    pid = renderer.pid
    assert pid is not None and pid != os.getpid()
    await renderer.render("qwen", QWEN2_CHAT_TEMPLATE, tok.chat_variables(MESSAGES))
    assert renderer.pid == pid  # one persistent process


async def test_nested_loops_are_stopped_at_the_budget_and_the_verdict_is_kept(
    renderer: TemplateRenderer,
) -> None:
    normal = _tokenizer(QWEN2_CHAT_TEMPLATE)
    await renderer.render("qwen", QWEN2_CHAT_TEMPLATE, normal.chat_variables(MESSAGES))
    first = renderer.pid
    variables = _tokenizer(NESTED_LOOPS).chat_variables(MESSAGES)
    t0 = time.monotonic()
    queued = asyncio.create_task(renderer.render("evil:1b", NESTED_LOOPS, variables))
    with pytest.raises(TemplateOverBudget) as refused:
        await renderer.render("evil:1b", NESTED_LOOPS, variables)
    assert 0.5 <= time.monotonic() - t0 < 0.5 + SLACK_S
    with pytest.raises(TemplateOverBudget, match="earlier"):  # it waited, then was refused unrun
        await queued
    assert time.monotonic() - t0 < 0.5 + SLACK_S
    text = str(refused.value)
    assert "model 'evil:1b'" in text and "0.5 s" in text and "did not finish within 0.5 s" in text
    assert renderer.pid is None  # killed; the next render starts another
    assert first is not None and not _alive(first)

    t0 = time.monotonic()
    with pytest.raises(TemplateOverBudget, match="model 'other': its chat template went past its budget earlier"):
        await renderer.render("other", NESTED_LOOPS, variables)
    assert time.monotonic() - t0 < 0.1 and renderer.pid is None  # no process asked

    # another model's template still renders, in a fresh process
    got = await renderer.render("qwen", QWEN2_CHAT_TEMPLATE, normal.chat_variables(MESSAGES))
    assert got == normal.apply_chat_template(MESSAGES) and renderer.pid not in (None, first)


async def test_the_verdict_expires() -> None:
    clock = Clock()
    r = TemplateRenderer(Budget(seconds=5.0, verdict_seconds=60.0), clock=clock)
    try:
        variables = _tokenizer("").chat_variables(MESSAGES)
        with pytest.raises(TemplateOverBudget, match="repeats a sequence"):
            await r.render("m", "{{ 'x' * 10**9 }}", variables)
        assert r.pid is None  # a process that went past the budget is replaced
        clock.now = 59.0
        with pytest.raises(TemplateOverBudget, match="earlier"):
            await r.render("m", "{{ 'x' * 10**9 }}", variables)
        clock.now = 61.0
        with pytest.raises(TemplateOverBudget, match="now"):
            await r.render("m", "{{ 'x' * 10**9 }}", variables)
    finally:
        await r.close()


async def test_memory_is_capped_in_the_renderer_not_here(renderer: TemplateRenderer) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    variables = _tokenizer("").chat_variables(MESSAGES)
    for source in (DOUBLING, "{{ '%0*d' % (10**9, 1) }}", "{{ 'x' * 10**9 }}"):
        with pytest.raises(TemplateOverBudget, match=r"memory budget|repeats a sequence"):
            await renderer.render("evil", source, variables)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB


async def test_output_budget_grows_with_the_input() -> None:
    r = TemplateRenderer(Budget(output_floor=1000, output_per_input_char=2))
    try:
        echo = "{% for m in messages %}{{ m.content }}{% endfor %}"
        long = [{"role": "user", "content": "a" * 5000}]
        assert await r.render("m", echo, {"messages": long}) == "a" * 5000
        with pytest.raises(TemplateOverBudget, match="wrote more than"):
            await r.render("m", "{% for i in range(2000) %}x{% endfor %}", {"messages": []})
    finally:
        await r.close()


async def test_large_messages_are_refused_alone(renderer: TemplateRenderer) -> None:
    """Past the budget with large messages, the messages may be why: no verdict."""
    big = [{"role": "user", "content": "a" * (renderer.budget.blame_input_chars + 1)}]
    source = "{% for m in messages %}{{ m.content * 40000 }}{% endfor %}"
    with pytest.raises(TemplateOverBudget, match=r"on these \d+ characters of messages"):
        await renderer.render("m", source, {"messages": big})
    assert renderer.verdicts.get(template_key(source)) is None
    assert await renderer.render("m", source, {"messages": [{"role": "user", "content": "a"}]}) == "a" * 40000


async def test_template_errors_are_not_verdicts(renderer: TemplateRenderer) -> None:
    tok = _tokenizer(QWEN2_CHAT_TEMPLATE)
    with pytest.raises(RenderError, match="Unknown role robot") as failed:
        await renderer.render("qwen", QWEN2_CHAT_TEMPLATE, tok.chat_variables([{"role": "robot", "content": "x"}]))
    assert not isinstance(failed.value, TemplateOverBudget)
    assert await renderer.render("qwen", QWEN2_CHAT_TEMPLATE, tok.chat_variables(MESSAGES))


async def test_a_cancelled_render_stops_the_process(patient: TemplateRenderer) -> None:
    renderer = patient
    variables = _tokenizer("").chat_variables(MESSAGES)
    await renderer.render("plain", "hello", variables)
    pid = renderer.pid
    assert pid is not None
    task = asyncio.create_task(renderer.render("evil", NESTED_LOOPS, variables))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert renderer.pid is None and not _alive(pid)


async def test_a_renderer_that_dies_mid_render_is_a_refusal(patient: TemplateRenderer) -> None:
    renderer = patient
    variables = _tokenizer("").chat_variables(MESSAGES)
    await renderer.render("plain", "hello", variables)
    pid = renderer.pid
    assert pid is not None
    task = asyncio.create_task(renderer.render("evil", NESTED_LOOPS, variables))
    await asyncio.sleep(0.1)
    os.kill(pid, signal.SIGTERM)
    # The exit code is -15, or 255 where another waiter reaped the child
    # first (asyncio's child watcher then says "unknown child process").
    with pytest.raises(TemplateOverBudget, match=r"the renderer process died \(exit code (-15|255)\)"):
        await task
    assert await renderer.render("plain", "hello", variables) == "hello"
    assert renderer.pid not in (None, pid)


def test_verdicts_are_bounded() -> None:
    clock = Clock()
    v = Verdicts(10.0, clock, kept=2)
    v.record("a", "why a")
    v.record("b", "why b")
    v.record("c", "why c")
    assert (v.get("a"), v.get("b"), v.get("c")) == (None, "why b", "why c")
    clock.now = 10.0
    assert v.get("b") is None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
