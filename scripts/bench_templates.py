#!/usr/bin/env python3
"""Benchmark chat template rendering: what the budget costs a normal render, and what a
hostile template gets before it is refused.

    python scripts/bench_templates.py [--renders 500] [--json]

Normal renders (a four-message chat, SmolLM2's and Qwen2's ChatML templates and a Llama-3
style one): the plain sandbox in this process (how the API rendered before), the bounded
sandbox in this process, and node/api/templates.py's renderer process (what the API does
now: a JSON round trip over a pipe). Hostile templates (nested loops, ``'x' * 10**9``,
doubling a string with ``~``, a ``%0*d`` format a gigabyte wide, a 2**n output): seconds
to the refusal, the renderer process's peak resident memory (VmHWM, polled) and how much
this process's own peak grew.

JSON keys: normal (per template: plain_us, bounded_us, process_ms), spawn_s, hostile (per
case: seconds, refusal, renderer_peak_mib), parent_peak_growth_mib, budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jinja2.ext
import jinja2.sandbox

from node.api.templates import Budget, RenderError, TemplateRenderer
from node.engine.chat_template import compile_chat_template, render_chat
from node.testing.tinymodel import LLAMA_CHAT_TEMPLATE, QWEN2_CHAT_TEMPLATE

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
TEMPLATES = {"smollm2": SMOLLM2, "qwen2-chatml": QWEN2_CHAT_TEMPLATE, "llama": LLAMA_CHAT_TEMPLATE}
VARIABLES: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hello there, how are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
        {"role": "user", "content": "Tell me a joke about bees."},
    ],
    "add_generation_prompt": True, "bos_token": "<s>", "eos_token": "</s>", "tools": None, "documents": None,
}
HOSTILE = {
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "'x' * 10**9": "{{ 'x' * 10**9 }}",
    "~ doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                  "{% endfor %}{{ ns.s | length }}",
    "'%0*d' 1 GB wide": "{{ '%0*d' % (10**9, 1) }}",
    "100 MB of output": "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
}


def _per_call(fn: Any, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _peak_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def _hostile(renderer: TemplateRenderer, source: str) -> dict[str, Any]:
    await renderer.close()
    await renderer.render("warm-up", "x", VARIABLES)  # a fresh process to watch
    peak = 0.0
    task = asyncio.create_task(renderer.render("hostile", source, VARIABLES))
    t0 = time.perf_counter()
    while not task.done():
        peak = max(peak, _peak_mib(renderer.pid))
        await asyncio.sleep(0.02)
    seconds = time.perf_counter() - t0
    peak = max(peak, _peak_mib(renderer.pid))
    try:
        task.result()
        refusal = "rendered"
    except RenderError as exc:
        refusal = str(exc).split(": ", 2)[-1].split(". The template")[0]
    return {"seconds": round(seconds, 3), "refusal": refusal, "renderer_peak_mib": round(peak, 1)}


async def run(renders: int) -> dict[str, Any]:
    plain_env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    budget = Budget()
    renderer = TemplateRenderer(budget)
    t0 = time.perf_counter()
    await renderer.render("spawn", "x", VARIABLES)
    spawn_s = time.perf_counter() - t0
    normal: dict[str, Any] = {}
    for name, source in TEMPLATES.items():
        plain, bounded = plain_env.from_string(source), compile_chat_template(source)
        assert render_chat(bounded, VARIABLES) == plain.render(**VARIABLES)
        t0 = time.perf_counter()
        for _ in range(renders):
            await renderer.render(name, source, VARIABLES)
        normal[name] = {
            "plain_us": round(_per_call(lambda p=plain: p.render(**VARIABLES), renders) * 1e6, 1),
            "bounded_us": round(_per_call(lambda b=bounded: render_chat(b, VARIABLES), renders) * 1e6, 1),
            "process_ms": round((time.perf_counter() - t0) / renders * 1e3, 3),
        }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hostile = {name: await _hostile(renderer, source) for name, source in HOSTILE.items()}
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    await renderer.close()
    return {"normal": normal, "spawn_s": round(spawn_s, 3), "hostile": hostile,
            "parent_peak_growth_mib": round(growth, 1),
            "budget": budget.describe(len(json.dumps(VARIABLES)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--renders", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args.renders))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"budget: {result['budget']}; renderer start {result['spawn_s'] * 1e3:.0f} ms")
    print(f"{'template':<14} {'plain µs':>9} {'bounded µs':>11} {'process ms':>11}")
    for name, row in result["normal"].items():
        print(f"{name:<14} {row['plain_us']:>9} {row['bounded_us']:>11} {row['process_ms']:>11}")
    print(f"\n{'hostile':<18} {'s':>6} {'renderer MiB':>13}  refusal")
    for name, row in result["hostile"].items():
        print(f"{name:<18} {row['seconds']:>6} {row['renderer_peak_mib']:>13}  {row['refusal']}")
    print(f"\nthis process's peak memory grew {result['parent_peak_growth_mib']} MiB")


if __name__ == "__main__":
    main()
