"""llama.cpp (llama-cpp-python) as the benchmarks' reference: greedy decode, prefill,
perplexity, peak memory and quantizing a GGUF, all through the same few calls.

llama-cpp-python is not a dependency of the project: ``missing()`` says why it cannot be
imported, and callers report null figures. Written against 0.3.x, where ``Llama.eval``
fills ``Llama.scores`` only with ``logits_all=True``: the last position's logits are read
with the context's own getter (``llama_get_logits_ith(ctx, -1)``) instead.

    python scripts/llamacpp_ref.py --peak-rss FILE.gguf [--threads N]

prints the peak RSS growth (bytes) of a fresh process loading FILE and decoding a few
tokens, the way bench_gguf.py measures the engine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

WARM = 2  # decode steps before the timed ones (the first calls allocate)


def missing() -> str | None:
    """Why llama-cpp-python cannot be used here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python is not installed ({exc}); pip install llama-cpp-python"
    return None


def affinity_threads() -> int:
    """The CPUs this process may run on: the engine's XLA uses these, so llama.cpp gets as many."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Decode:
    tok_s: float  # over the timed steps
    tokens: list[int]  # every generated token, warm-up steps included, in order


class LlamaCpp:
    """One loaded GGUF and one context. ``n_threads`` and ``n_threads_batch`` are both
    ``threads``: decode and prefill run on the same cores as the engine's."""

    def __init__(self, path: Path, *, threads: int, n_ctx: int = 1024, n_batch: int = 512,
                 logits_all: bool = False) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.n_batch = n_batch
        self.logits_all = logits_all

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _last_logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _next(self, ids: Sequence[int]) -> int:
        """Evaluate ids after what the context holds; the greedy next token."""
        self.llm.eval(list(ids))
        return int(np.argmax(self._last_logits()))

    def greedy(self, prompt: Sequence[int], new: int) -> Decode:
        """Greedy decode from an empty context: the prompt in n_batch chunks, WARM untimed
        steps, then `new` timed steps of one token each."""
        self.llm.reset()  # eval drops the cache from n_tokens on
        tokens = [self._next(prompt)]
        for _ in range(WARM):
            tokens.append(self._next(tokens[-1:]))
        t0 = time.perf_counter()
        for _ in range(new):
            tokens.append(self._next(tokens[-1:]))
        return Decode(new / (time.perf_counter() - t0), tokens)

    def prefill_tok_s(self, prompt: Sequence[int]) -> float:
        """tok/s of evaluating `prompt` from an empty context (n_batch tokens a call)."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(list(prompt))
        return len(prompt) / (time.perf_counter() - t0)

    def perplexity(self, ids: Sequence[int]) -> float:
        """exp(mean NLL) of ids[1:] given the tokens before each, in one window from position
        0 (as the engine's runner.perplexity: one all-logits prefill, no BOS added)."""
        if not self.logits_all:
            raise ValueError("perplexity needs a context opened with logits_all=True")
        if len(ids) < 2 or len(ids) > self.llm.n_ctx():
            raise ValueError(f"perplexity takes 2 to {self.llm.n_ctx()} tokens, got {len(ids)}")
        self.llm.reset()
        self.llm.eval(list(ids))
        x = np.asarray(self.llm.scores[: len(ids) - 1], dtype=np.float64)
        x = x - x.max(axis=1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
        nll = -logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
        return float(np.exp(nll.mean()))


def greedy_ids(path: Path, prompt: Sequence[int], n: int, threads: int | None = None) -> list[int]:
    """llama.cpp's first n greedy tokens after `prompt` on the GGUF at `path`."""
    with LlamaCpp(path, threads=threads or affinity_threads(), n_ctx=len(prompt) + n + WARM + 1) as ref:
        return ref.greedy(prompt, max(0, n - 1 - WARM)).tokens[:n]


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where the two token lists differ (a length difference
    counts at the shorter one's end), None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def quantize(src: Path, dst: Path, ftype: str, threads: int | None = None) -> Path:
    """llama.cpp's quantizer: `src` (F32/F16 GGUF) to `dst` as LLAMA_FTYPE_MOSTLY_<ftype>
    (Q4_K_M, Q8_0, ...), with its own per-tensor choices and shape fallbacks."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads or affinity_threads()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {ftype} failed ({rc})")
    return dst


def tensor_types(path: Path) -> dict[str, list[str]]:
    """{tensor kind (name without blk.N.): the GGUF types it is stored in} of a file."""
    import gguf

    out: dict[str, set[str]] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        kind = t.name.split(".", 2)[2] if t.name.startswith("blk.") else t.name
        out.setdefault(kind, set()).add(t.tensor_type.name)
    return {k: sorted(v) for k, v in sorted(out.items())}


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of the file's tensors a decode step reads: all but an untied embedding table
    (gathered, one row a token)."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if tied or t.name != "token_embd.weight")


def file_bytes_per_param(path: Path) -> float:
    """The file's tensor bytes over its parameter count (norms and biases included)."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    return sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def peak_rss(path: Path, threads: int | None = None, timeout: float = 900) -> int:
    """In a fresh process: the peak RSS growth of llama.cpp loading `path` and decoding."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--peak-rss", str(path), "--threads",
                          str(threads or affinity_threads())], capture_output=True, text=True, check=True,
                         timeout=timeout)
    return int(out.stdout.strip().splitlines()[-1])


def _measure_peak(path: Path, threads: int, context: int = 512, prompt: int = 32) -> int:
    """The file is mmapped: the pages it touches count in the RSS, as the engine's reads do."""
    import llama_cpp  # noqa: F401  (the library and its backends load before the baseline)
    from bench_engine import proc_status

    base = proc_status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    with LlamaCpp(path, threads=threads, n_ctx=context) as ref:
        rng = np.random.default_rng(0)
        ref.greedy([int(x) for x in rng.integers(0, ref.n_vocab, prompt)], 4)
    return proc_status("VmHWM:") - base


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-rss", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None)
    args: Any = ap.parse_args(argv)
    print(_measure_peak(args.peak_rss, args.threads or affinity_threads()))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
