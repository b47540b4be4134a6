#!/usr/bin/env bash
# One prepared accelerator check for the JAX engine: lists the GPU, checks that jax sees
# it, compares engine logits and greedy tokens on the device against transformers on CPU
# for tiny Llama and Qwen2 checkpoints, then benchmarks the llama8b shape in bf16.
# Results land in $OUT (default /tmp/gpu_check). QUICK=1: tiny sizes (CPU smoke test).
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{ nvidia-smi -L 2>&1 || echo "nvidia-smi not available"; } | tee "$OUT/devices.txt"
$PY -c 'import jax; print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())' \
  2>&1 | tee -a "$OUT/devices.txt"

$PY - <<'PYEOF' 2>&1 | tee "$OUT/correctness.txt"
import sys, tempfile
import jax
import numpy as np
import torch
import transformers

# f32 matmuls on GPU default to reduced precision (TF32); the check wants full precision.
jax.config.update("jax_default_matmul_precision", "highest")
from node.engine import PartitionSpec, SamplingParams, WeightSource, generate, load_chain, load_config, split_layers

print("jax backend:", jax.default_backend())
failed = False
for arch in ("llama", "qwen2"):
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=320, max_position_embeddings=256)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
    model = model.eval()
    model.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        config = load_config(d)
        for parts in (1, 2):
            chain = load_chain(WeightSource.from_dir(d), config, split_layers(config.num_layers, parts),
                               dtype="float32", max_context=128, prefill_chunk=32)
            ids = list(range(5, 75))
            _, logits = chain.prefill(chain.new_caches(1), ids, all_logits=True)
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
                hf_tokens = model.generate(torch.tensor([ids[:9]]), max_new_tokens=24, do_sample=False,
                                           pad_token_id=0)[0, 9:].tolist()
            err = float(np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max())
            tokens = [t for t, _ in generate(chain, ids[:9], SamplingParams(), 24)]
            ok = err < 1e-4 and tokens == hf_tokens
            failed |= not ok
            print(f"{arch} partitions={parts} device={jax.tree_util.tree_leaves(chain.partitions[0].params)[0].devices()} "
                  f"max_rel_err={err:.2e} greedy_match={tokens == hf_tokens} {'OK' if ok else 'FAIL'}")
sys.exit(1 if failed else 0)
PYEOF
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "$QUICK" = 1 ]; then
  $PY scripts/bench_engine.py --shape quick --no-transformers --no-llamacpp --json \
    > "$OUT/bench_quick.json" 2> "$OUT/bench_quick.err" || status=1
  cat "$OUT/bench_quick.json"
else
  # Llama-3-8B shape, bf16, random weights on the device: tail step (batch 1, 8, sampled),
  # decode_steps, the bandwidth ceiling, and JAX's peak memory against memory_needed().
  timeout 300 $PY scripts/bench_engine.py --shape llama8b --dtype bfloat16 --json \
    > "$OUT/bench_llama8b.json" 2> "$OUT/bench_llama8b.err" || status=1
  cat "$OUT/bench_llama8b.json"; tail -5 "$OUT/bench_llama8b.err"
fi
echo "gpu_check status=$status"
exit $status
