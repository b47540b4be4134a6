"""Chat template rendering under bounds, in this process or in a renderer subprocess.

A chat template is Jinja that comes with the model, so from whoever published it. The sandbox
(transformers' ImmutableSandboxedEnvironment) stops escapes but not cost: nested loops run
for days and ``'x' * 10**9`` takes gigabytes. Three bounds live here:

* sizes: ``+``, ``*`` and ``**`` are checked before they run (strings, lists and integers
  past ``MAX_ITEMS`` / ``MAX_INT_BITS`` are refused), ``range`` stays at Jinja's sandbox
  limit, and the rendered text is counted as it is produced (``render_chat``'s
  ``max_output``);
* time and memory: ``main`` is a renderer process (node/api/templates.py starts it)
  that caps its own address space and, per render, its CPU seconds, so a runaway template
  is killed by the kernel even if its parent is gone; the parent kills it sooner, at the
  wall-clock budget;
* the channel: frames are a 4-byte length and UTF-8 JSON, never pickle, so a renderer that
  misbehaves cannot make its parent run code.

No JAX, no asyncio and no networking here.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import resource
import signal
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import IO, Any

import jinja2
import jinja2.ext
import jinja2.sandbox

__all__ = [
    "MAX_INT_BITS",
    "MAX_ITEMS",
    "TemplateBudgetError",
    "TemplateRenderError",
    "compile_chat_template",
    "main",
    "read_frame",
    "render_chat",
    "template_key",
    "write_frame",
]

# Far above any real chat (a 4 MiB prompt is the API's limit), far below what hurts.
MAX_ITEMS = 32 * 2**20
MAX_INT_BITS = 2**16
# A frame larger than this is refused before it is read (the API caps prompts at 4 MiB).
MAX_FRAME_BYTES = 256 * 2**20
_HEADER = struct.Struct(">I")
_COMPILED_KEPT = 16
_PR_SET_PDEATHSIG = 1


class TemplateRenderError(Exception):
    """A chat template cannot be compiled, or refused or failed on these messages."""


class TemplateBudgetError(TemplateRenderError):
    """A chat template went past a size, time or memory bound."""


def template_key(source: str) -> str:
    """The name a template's verdicts and compiled form are kept under."""
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change prompts; match transformers.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _size(x: Any) -> int | None:
    return len(x) if isinstance(x, str | bytes | list | tuple) else None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would be too large, before Python computes it."""
    if operator == "+":
        a, b = _size(left), _size(right)
        if a is not None and b is not None and a + b > MAX_ITEMS:
            raise TemplateBudgetError(f"the template joins two sequences into {a + b} items (at most {MAX_ITEMS})")
    elif operator == "*":
        for seq, times in ((left, right), (right, left)):
            n = _size(seq)
            if n is not None and _is_int(times) and n * times > MAX_ITEMS:
                raise TemplateBudgetError(
                    f"the template repeats a sequence into {n * times} items (at most {MAX_ITEMS})"
                )
        if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateBudgetError(f"the template multiplies integers past {MAX_INT_BITS} bits")
    elif operator == "**" and _is_int(left) and _is_int(right) and abs(left) > 1:
        if right > 0 and right * left.bit_length() > MAX_INT_BITS:
            raise TemplateBudgetError(f"the template raises an integer past {MAX_INT_BITS} bits")


class _BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' sandbox with ``+``, ``*`` and ``**`` checked first (constant folding
    is off for intercepted operators, so the check also runs for ``'x' * 10**9``)."""

    intercepted_binops = frozenset({"+", "*", "**"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses (sandboxed, same helpers),
    with the size checks above."""
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateRenderError(
            f"chat template has a syntax error at line {exc.lineno}: {exc.message}"
        ) from exc
    except RecursionError as exc:
        raise TemplateBudgetError("the chat template is nested too deeply to compile") from exc


def render_chat(
    template: jinja2.Template, variables: Mapping[str, Any], max_output: int | None = None
) -> str:
    """The text `template` renders from `variables`, at most `max_output` characters.

    Errors are TemplateRenderError with what transformers users would see; a bound that is
    reached is TemplateBudgetError.
    """
    pieces: list[str] = []
    produced = 0
    try:
        for piece in template.generate(**variables):
            produced += len(piece)
            if max_output is not None and produced > max_output:
                raise TemplateBudgetError(f"the template wrote more than {max_output} characters")
            pieces.append(piece)
    except TemplateBudgetError:
        raise
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateRenderError(f"chat template refused the messages: {exc}") from exc
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise TemplateRenderError(
            f"chat template failed on these messages: {type(exc).__name__}: {exc}"
        ) from exc
    except OverflowError as exc:  # the sandbox's range limit, float overflow
        raise TemplateBudgetError(f"the template went past a size limit: {exc}") from exc
    except RecursionError as exc:
        raise TemplateBudgetError("the template recursed too deeply") from exc
    except MemoryError as exc:
        raise TemplateBudgetError("the template ran out of its memory budget") from exc
    return "".join(pieces)


# --- the wire ---------------------------------------------------------------------------------


def write_frame(out: IO[bytes], obj: Any) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def read_frame(inp: IO[bytes], max_bytes: int = MAX_FRAME_BYTES) -> Any:
    """The next frame's value, or None at the end of the stream."""
    header = inp.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    if size > max_bytes:
        raise ValueError(f"frame of {size} bytes is over the {max_bytes}-byte limit")
    data = inp.read(size)
    if len(data) < size:
        return None
    return json.loads(data.decode("utf-8", "surrogatepass"))


# --- the renderer process ---------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when its parent dies (best effort elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _address_space_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _lower(limit: int, soft: int) -> None:
    _, hard = resource.getrlimit(limit)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(limit, (soft, hard))


def _limit_process(memory_bytes: int) -> None:
    """Cap this process: its address space (what it has now plus `memory_bytes`), no core
    files, no children (root ignores that last one)."""
    used = _address_space_bytes()
    if used:
        _lower(resource.RLIMIT_AS, used + memory_bytes)
    _lower(resource.RLIMIT_CORE, 0)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _limit_cpu(seconds: float) -> None:
    """The kernel stops this process (SIGXCPU) if this render uses more than `seconds` of CPU."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _lower(resource.RLIMIT_CPU, math.ceil(usage.ru_utime + usage.ru_stime + seconds) + 1)


def _serve_one(request: Any, compiled: OrderedDict[str, jinja2.Template],
               limit_cpu: Callable[[float], None]) -> dict[str, str]:
    try:
        source, variables = request["template"], request["variables"]
        max_output, seconds = int(request["max_output"]), float(request["seconds"])
        if not isinstance(source, str) or not isinstance(variables, dict):
            raise TypeError("template must be text and variables an object")
    except (TypeError, KeyError, ValueError) as exc:
        return {"error": f"bad render request: {exc}"}
    limit_cpu(seconds)
    try:
        key = template_key(source)
        template = compiled.get(key)
        if template is None:
            template = compiled[key] = compile_chat_template(source)
            if len(compiled) > _COMPILED_KEPT:
                compiled.popitem(last=False)
        compiled.move_to_end(key)
        return {"text": render_chat(template, variables, max_output)}
    except TemplateBudgetError as exc:
        return {"budget": str(exc)}
    except TemplateRenderError as exc:
        return {"error": str(exc)}
    except MemoryError:
        return {"budget": "the template ran out of its memory budget"}


def main(argv: list[str] | None = None) -> None:
    """Serve render requests on stdin/stdout until stdin closes: ``PARENT_PID MEMORY_BYTES``."""
    args = sys.argv[1:] if argv is None else argv
    parent, memory_bytes = int(args[0]), int(args[1])
    _die_with_parent(parent)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the frames
    _limit_process(memory_bytes)
    compiled: OrderedDict[str, jinja2.Template] = OrderedDict()
    write_frame(out, {"ready": os.getpid()})
    while (request := read_frame(inp)) is not None:
        write_frame(out, _serve_one(request, compiled, _limit_cpu))


if __name__ == "__main__":
    main()
