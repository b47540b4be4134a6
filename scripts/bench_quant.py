"""Microbenchmark of the int8 products (node/engine/quant.py) against the plain matmul.

    python scripts/bench_quant.py [--rows 1,2,8] [--matrices 16] [--rounds 5]
        [--shapes 896x4864,4864x896,151936x896] [--json]

Per matmul y[out, M] = W[out, in] @ x[in, M], the way transformer.linear computes it:
f32, int8 "w8a8" (activations quantized per column, int8 GEMM) and int8 "weight_only"
(convert to f32, then the f32 GEMM). Each call multiplies `--matrices` distinct matrices
(their total is larger than the CPU's last-level cache, so weights come from memory as in
a model), and the variants are timed in alternating rounds, best of each: on a shared
machine the speed drifts, and interleaving makes the drift hit all alike. Shapes whose
f32 matrix is over 256 MB use one matrix per call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


VARIANTS = ("f32", "w8a8", "weight_only")


def measure(
    out: int, inn: int, rows: list[int], matrices: int, rounds: int
) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    import node.engine  # noqa: F401  (sets the engine's XLA flags before JAX's backend starts)
    from node.engine.quant import W8A8, WEIGHT_ONLY, qmatmul, quantize

    k = 1 if out * inn * 4 > 256 << 20 else matrices
    key = jax.random.PRNGKey(0)
    ws = []
    for _ in range(k):
        key, sub = jax.random.split(key)
        ws.append(0.02 * jax.random.normal(sub, (out, inn), jnp.float32))
    qa = [quantize(w, "float32", W8A8) for w in ws]
    qb = [quantize(w, "float32", WEIGHT_ONLY) for w in ws]
    dn = (((1,), (0,)), ((), ()))

    def f32(ws: list[jax.Array], x: jax.Array) -> jax.Array:
        return sum(jax.lax.dot_general(w, x, dn) for w in ws)  # type: ignore[return-value]

    def q8(qs: list[Any], x: jax.Array) -> jax.Array:
        return sum(qmatmul(q, x) for q in qs)  # type: ignore[return-value]

    fns = {"f32": (jax.jit(f32), ws), "w8a8": (jax.jit(q8), qa), "weight_only": (jax.jit(q8), qb)}
    results = []
    for m in rows:
        x = jax.random.normal(jax.random.PRNGKey(m), (inn, m), jnp.float32)
        for fn, arg in fns.values():
            fn(arg, x).block_until_ready()  # compile
        best = dict.fromkeys(VARIANTS, float("inf"))
        for _ in range(rounds):
            for name, (fn, arg) in fns.items():
                for _ in range(3):
                    t0 = time.perf_counter()
                    fn(arg, x).block_until_ready()
                    best[name] = min(best[name], (time.perf_counter() - t0) / k)
        row = {"shape": f"{out}x{inn}", "rows": m, **{f"{n}_ms": best[n] * 1e3 for n in VARIANTS}}
        row["f32_over_w8a8"] = best["f32"] / best["w8a8"]
        results.append(row)
        print(
            f"{out:>7}x{inn:<6} rows {m:<4}"
            + "".join(f"{n} {best[n] * 1e3:8.3f} ms  " for n in VARIANTS)
            + f"f32/w8a8 {row['f32_over_w8a8']:.2f}x",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", default="1,2,8")
    ap.add_argument("--matrices", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default="896x4864,4864x896,151936x896")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for shape in args.shapes.split(","):
        out, inn = (int(d) for d in shape.split("x"))
        results += measure(out, inn, rows, args.matrices, args.rounds)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
