"""Benchmark the JAX engine (and transformers on the same weights) on a random model.

    python scripts/bench_engine.py [--shape qwen0.5b|llama8b] [--dtypes float32,bfloat16]
        [--no-transformers] [--only-decode] [--quick] [--json]

Measures, per dtype, with 128-token prompts and 128 new tokens (greedy):
- decode_tok_s / batch8_tok_s: the single-step path pipelines use (decode, then
  sample_batch and a host round trip per token), at batch 1 and aggregate at batch 8;
- decode_multistep_tok_s / batch8_multistep_tok_s: the one-partition fast path
  (decode_steps: blocks of 16 steps with sampling on the device);
- unless --only-decode: generate() end to end, prefill tok/s (512-token prompt), and
  transformers generate (torch, CPU) on the same weights;
- the memory-bandwidth ceiling for batch-1 decode: measured copy bandwidth / bytes read per
  decode step (weights actually touched + the KV cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from node.engine import (
    Chain,
    ModelConfig,
    Partition,
    PartitionSpec,
    SamplerState,
    SamplingParams,
    WeightSource,
    generate,
    load_partition,
    parse_config,
    partition_param_count,
    sample_batch,
)
from node.engine.weights import LayerParams, PartitionParams

SHAPES: dict[str, dict[str, Any]] = {
    "qwen0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "hidden_act": "silu",
    },
    "llama8b": {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "hidden_act": "silu",
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "quick": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
    },
}


def random_params(cfg: ModelConfig, dtype: str, seed: int = 0) -> PartitionParams:
    """Random weights built on the device in the engine's layout (no checkpoint needed)."""
    H, F, V, Q, KV = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.q_size, cfg.kv_size
    key = jax.random.PRNGKey(seed)

    def rnd(shape: tuple[int, ...]) -> jax.Array:
        nonlocal key
        key, sub = jax.random.split(key)
        return (0.02 * jax.random.normal(sub, shape, jnp.float32)).astype(dtype)

    layers = tuple(
        LayerParams(
            ln1=jnp.ones((H,), dtype),
            wqkv=rnd((H, Q + 2 * KV)),
            bqkv=rnd((Q + 2 * KV,)) if cfg.qkv_bias else None,
            wo=rnd((Q, H)),
            bo=rnd((H,)) if cfg.o_bias else None,
            ln2=jnp.ones((H,), dtype),
            wgu=rnd((H, 2 * F)),
            wd=rnd((F, H)),
        )
        for _ in range(cfg.num_layers)
    )
    embed = rnd((V, H))
    head = None if cfg.tie_word_embeddings else rnd((H, V))
    params = PartitionParams(embed, layers, jnp.ones((H,), dtype), head)
    n = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    assert n == partition_param_count(cfg, PartitionSpec.whole(cfg)), (
        "layout drifted from weights.py"
    )
    return params


def measure_bandwidth() -> float:
    """Bytes/s of the best of a large on-device copy (read + write counted) and a large
    sum (read only): XLA CPU runs elementwise copies on one thread, reductions faster.

    On an accelerator a 256 MiB copy takes ~0.1 ms, so launch and sync overhead would
    dominate: there the buffer is 2 GiB and each timed region runs several launches back
    to back (synchronising once), best of several regions."""
    on_cpu = jax.devices()[0].platform == "cpu"
    n = (64 if on_cpu else 512) * 1024 * 1024  # float32: 256 MiB on CPU, 2 GiB otherwise
    iters, regions = (1, 5) if on_cpu else (8, 5)
    x = jnp.ones((n,), jnp.float32)
    best = 0.0
    for fn, traffic in ((jax.jit(lambda a: a + 1.0), 2 * x.nbytes), (jax.jit(jnp.sum), x.nbytes)):
        fn(x).block_until_ready()
        fastest = float("inf")
        for _ in range(regions):
            t = time.perf_counter()
            outs = [fn(x) for _ in range(iters)]
            jax.block_until_ready(outs)
            fastest = min(fastest, (time.perf_counter() - t) / iters)
            del outs
        best = max(best, traffic / fastest)
    del x
    return best


def weights_gemv_seconds(part: Partition) -> float:
    """Seconds for XLA to multiply one row vector by every matrix a decode step reads (the
    layer matrices and the head), nothing else: the floor for a batch-1 step given XLA's
    own matrix-vector kernels, to tell kernel speed from overhead. Several launches run
    back to back per timed region, as in measure_bandwidth."""
    params = part.params
    mats = [w for layer in params.layers for w in (layer.wqkv, layer.wo, layer.wgu, layer.wd)]
    if params.head is not None:
        mats.append(params.head)
    else:  # tied head: the embedding table, used transposed
        assert params.embed is not None
        mats.append(params.embed.T)

    @jax.jit
    def gemvs(ws: list[jax.Array]) -> jax.Array:
        total = jnp.zeros((), jnp.float32)
        for w in ws:
            v = jnp.ones((1, w.shape[0]), w.dtype)
            total = total + jnp.sum((v @ w).astype(jnp.float32))
        return total

    gemvs(mats).block_until_ready()
    iters = 1 if jax.devices()[0].platform == "cpu" else 8
    fastest = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready([gemvs(mats) for _ in range(iters)])
        fastest = min(fastest, (time.perf_counter() - t) / iters)
    return fastest


def bytes_per_decode_step(part: Partition, context: int) -> int:
    """Weights a batch-1 step reads (one embedding row, not the table, unless the table is
    also the head) plus the KV cache up to `context` tokens."""
    cfg, params = part.config, part.params
    total = params.nbytes
    if params.head is not None and params.embed is not None:
        total -= int(params.embed.nbytes)
    itemsize = jnp.dtype(part.dtype).itemsize
    return total + 2 * cfg.num_layers * context * cfg.kv_size * itemsize


BLOCK = 16  # decode_steps block in the multi-step measurements


def _prefilled(
    chain: Chain, prompts: list[list[int]]
) -> tuple[list[Any], np.ndarray, np.ndarray, list[SamplerState]]:
    """A cache with one prompt per slot, and each slot's first greedy token."""
    states = [SamplerState(SamplingParams(), chain.config.vocab_size) for _ in prompts]
    caches = chain.new_caches(len(prompts))
    toks = np.zeros(len(prompts), np.int32)
    for slot, ids in enumerate(prompts):
        caches, logits = chain.prefill(caches, ids, slot=slot)
        toks[slot] = int(sample_batch(logits[None], [states[slot]])[0][0])
    pos = np.asarray([len(p) for p in prompts], np.int32)
    return caches, toks, pos, states


def single_step_tok_s(chain: Chain, prompts: list[list[int]], new: int) -> float:
    """Aggregate tok/s of the pipeline's loop: decode, sample_batch (host sync), repeat."""
    caches, toks, pos, states = _prefilled(chain, prompts)
    for _ in range(2):  # compile and warm
        caches, logits = chain.decode(caches, toks, pos)
        toks = sample_batch(logits, states)[0].astype(np.int32)
        pos = pos + 1
    t0 = time.perf_counter()
    for _ in range(new):
        caches, logits = chain.decode(caches, toks, pos)
        toks = sample_batch(logits, states)[0].astype(np.int32)
        pos = pos + 1
    return len(prompts) * new / (time.perf_counter() - t0)


def multi_step_tok_s(chain: Chain, prompts: list[list[int]], new: int) -> float:
    """Aggregate tok/s of decode_steps in blocks of BLOCK steps (one host sync a block)."""
    caches, toks, pos, states = _prefilled(chain, prompts)
    caches, out, _ = chain.decode_steps(caches, toks, pos, states, BLOCK)  # compile
    toks, pos = out[:, -1].astype(np.int32), pos + BLOCK
    blocks = max(1, new // BLOCK)
    t0 = time.perf_counter()
    for _ in range(blocks):
        caches, out, _ = chain.decode_steps(caches, toks, pos, states, BLOCK)
        toks, pos = out[:, -1].astype(np.int32), pos + BLOCK
    return len(prompts) * blocks * BLOCK / (time.perf_counter() - t0)


def engine_numbers(
    chain: Chain, prompt: int, new: int, prefill_len: int, batch: int, only_decode: bool
) -> dict[str, float]:
    rng = np.random.default_rng(0)
    vocab = chain.config.vocab_size

    def ids(n: int) -> list[int]:
        return [int(x) for x in rng.integers(0, vocab, n)]

    res: dict[str, float] = {}
    for b, key in ((1, "decode"), (batch, f"batch{batch}")):
        prompts = [ids(prompt) for _ in range(b)]
        res[f"{key}_tok_s"] = single_step_tok_s(chain, prompts, new)
        print(f"  {key} single-step done", file=sys.stderr, flush=True)
        res[f"{key}_multistep_tok_s"] = multi_step_tok_s(chain, prompts, new)
        print(f"  {key} multi-step done", file=sys.stderr, flush=True)
    if only_decode:
        return res

    greedy = SamplingParams()
    first = ids(prompt)
    list(generate(chain, first, greedy, new + 1))  # compile every block size it uses
    caches = chain.new_caches(1)
    t0 = time.perf_counter()
    caches, logits = chain.prefill(caches, first)
    np.asarray(logits)
    t_prefill_short = time.perf_counter() - t0
    t = time.perf_counter()
    out = list(generate(chain, first, greedy, new + 1))
    assert len(out) == new + 1
    # generate() end to end, the prompt's prefill time taken out.
    res["generate_tok_s"] = new / (time.perf_counter() - t - t_prefill_short)

    long_ids = ids(prefill_len)
    caches, logits = chain.prefill(caches, long_ids)  # compile this bucket
    np.asarray(logits)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        caches, logits = chain.prefill(caches, long_ids)
        np.asarray(logits)
        best = min(best, time.perf_counter() - t0)
    res["prefill_tok_s"] = prefill_len / best
    return res


def transformers_numbers(
    model: Any, vocab: int, prompt: int, new: int, prefill_len: int
) -> dict[str, float]:
    import torch

    rng = np.random.default_rng(0)
    ids = torch.tensor([rng.integers(0, vocab, prompt).tolist()])
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=new + 1, min_new_tokens=new + 1, **kw)
        t2 = time.perf_counter()
        long_ids = torch.tensor([rng.integers(0, vocab, prefill_len).tolist()])
        model(long_ids)
        t3 = time.perf_counter()
        model(long_ids)
        t4 = time.perf_counter()
    return {
        "transformers_decode_tok_s": new / ((t2 - t1) - (t1 - t0)),
        "transformers_prefill_tok_s": prefill_len / (t4 - t3),
    }


def run_dtype(
    raw: dict[str, Any], dtype: str, args: argparse.Namespace, sizes: dict[str, int]
) -> dict[str, float]:
    cfg = parse_config(raw)
    spec = PartitionSpec.whole(cfg)
    context = 1024 if not args.quick else 256
    hf = None
    if args.transformers and not args.only_decode:
        import safetensors.torch
        import torch
        import transformers

        torch.manual_seed(0)
        hf_cfg = transformers.AutoConfig.for_model(
            cfg.model_type, **{k: v for k, v in raw.items() if k != "architectures"}
        )
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval().to(getattr(torch, dtype))
        state = {
            k: v.contiguous()
            for k, v in hf.state_dict().items()
            if not (cfg.tie_word_embeddings and k == "lm_head.weight")
        }
        blob = safetensors.torch.save(state)
        del state
        source = WeightSource.from_reader(lambda f, o, n: blob[o : o + n], ["model.safetensors"])
        part = load_partition(
            source, cfg, spec, dtype=dtype, max_context=context, prefill_chunk=512
        )
        del blob, source
    else:
        part = Partition(cfg, spec, random_params(cfg, dtype), dtype, context, 512)
    chain = Chain([part])
    res = engine_numbers(
        chain, sizes["prompt"], sizes["new"], sizes["prefill"], sizes["batch"], args.only_decode
    )
    step_bytes = bytes_per_decode_step(part, sizes["prompt"] + sizes["new"] // 2)
    res["bandwidth_gb_s"] = measure_bandwidth() / 1e9
    gemv_s = weights_gemv_seconds(part)
    res["gemv_floor_ms"] = gemv_s * 1e3
    res["gemv_gb_s"] = step_bytes / gemv_s / 1e9  # KV bytes included: ~1% at this context
    res["bandwidth_ceiling_tok_s"] = res["bandwidth_gb_s"] * 1e9 / step_bytes
    res["weights_gb"] = part.params.nbytes / 1e9
    del chain, part
    if hf is not None:
        res.update(
            transformers_numbers(
                hf, cfg.vocab_size, sizes["prompt"], sizes["new"], sizes["prefill"]
            )
        )
        res["decode_vs_transformers"] = res["decode_tok_s"] / res["transformers_decode_tok_s"]
    res["batch8_vs_batch1"] = res["batch8_tok_s"] / res["decode_tok_s"]
    res["decode_vs_ceiling"] = res["decode_tok_s"] / res["bandwidth_ceiling_tok_s"]
    res["decode_multistep_vs_ceiling"] = (
        res["decode_multistep_tok_s"] / res["bandwidth_ceiling_tok_s"]
    )
    res["decode_ms_per_step"] = 1e3 / res["decode_tok_s"]
    res["decode_multistep_ms_per_step"] = 1e3 / res["decode_multistep_tok_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=["qwen0.5b", "llama8b"], default="qwen0.5b")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false")
    ap.add_argument(
        "--only-decode",
        action="store_true",
        help="decode and bandwidth only: no prefill, generate() or transformers (short GPU runs)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke test")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    raw = dict(SHAPES["quick" if args.quick else args.shape])
    sizes = (
        {"prompt": 16, "new": 16, "prefill": 64, "batch": 8}
        if args.quick
        else {"prompt": 128, "new": 128, "prefill": 512, "batch": 8}
    )
    results: dict[str, dict[str, float]] = {}
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        results[dtype] = run_dtype(raw, dtype, args, sizes)
        print(f"[{dtype} done]", file=sys.stderr, flush=True)
    meta = {"device": str(jax.devices()[0]), "shape": "quick" if args.quick else args.shape}
    if args.json:
        print(json.dumps({**results, "meta": meta}, indent=2))
        return 0
    keys = sorted({k for r in results.values() for k in r})
    print(f"device {meta['device']}, shape {meta['shape']}")
    print(f"{'metric':32s}" + "".join(f"{d:>14s}" for d in results))
    for k in keys:
        print(f"{k:32s}" + "".join(f"{results[d].get(k, float('nan')):14.2f}" for d in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
