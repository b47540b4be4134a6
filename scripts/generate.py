"""Run a whole model on this machine: prompt in, generated text streamed to stdout.

    python scripts/generate.py MODEL_DIR --prompt TEXT [--chat] [--system TEXT]
        --max-tokens N [--temperature T] [--seed S] [--partitions K]

Only the generated text goes to stdout; timings go to stderr. --partitions K splits the
layers into K partitions chained in this process (the same code path a cluster uses).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.engine import (
    EngineError,
    SamplingParams,
    WeightSource,
    enable_compilation_cache,
    generate,
    load_chain,
    load_config,
    memory_needed,
    split_layers,
)
from node.engine.config import ModelConfig
from node.engine.tokenizer import Tokenizer


def choose_dtype(config: ModelConfig, requested: str, context: int) -> str:
    """auto: float32 on CPU when it fits in free memory (XLA CPU has no fast bf16 matmul),
    else the checkpoint's dtype."""
    if requested != "auto":
        return requested
    import jax
    import psutil

    native = (
        config.torch_dtype
        if config.torch_dtype in ("float32", "bfloat16", "float16")
        else "float32"
    )
    if jax.default_backend() != "cpu" or native == "float32":
        return native
    need = memory_needed(config, 0, config.num_layers, True, True, "float32", context, 1)
    return "float32" if need < 0.8 * psutil.virtual_memory().available else native


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model_dir", type=Path, help="a Hugging Face model directory or a GGUF file")
    ap.add_argument("--prompt", required=True)
    ap.add_argument(
        "--chat",
        action="store_true",
        help="render the prompt as a user message via the chat template",
    )
    ap.add_argument("--system", help="system message (with --chat)")
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="the KV cache's dtype (auto: float16 beside float32 compute)")
    ap.add_argument("--weights", default="native", choices=["native", "int8"],
                    help="int8: per-row int8 matrices (a quarter of float32's memory)")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument(
        "--compilation-cache", type=Path, help="directory for jax's persistent compilation cache"
    )
    args = ap.parse_args(argv)
    if args.system and not args.chat:
        ap.error("--system needs --chat")
    if args.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")
    try:
        if args.compilation_cache:
            enable_compilation_cache(args.compilation_cache)
        t0 = time.perf_counter()
        model_dir, source = args.model_dir, None
        if args.model_dir.is_file():  # a GGUF: its config and tokenizer come from its metadata
            import tempfile

            from node.gguf.sidecar import write_sidecars

            try:
                model_dir = write_sidecars(args.model_dir, tempfile.mkdtemp(prefix="enjambre-gguf-"))
            except ValueError as exc:  # GGUFError, GGUFConfigError, GGUFTokenizerError
                print(f"error: {args.model_dir}: {exc}", file=sys.stderr)
                return 2
            source = WeightSource.from_gguf(args.model_dir)
        config = load_config(model_dir)
        tokenizer = Tokenizer.from_model_dir(model_dir)
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": args.prompt})
            prompt = tokenizer.encode_chat(messages)
        else:
            prompt = tokenizer.encode(args.prompt)
        context = min(args.max_context, config.max_position_embeddings)
        dtype = choose_dtype(config, args.dtype, context)
        chain = load_chain(
            source or WeightSource.from_dir(args.model_dir),
            config,
            split_layers(config.num_layers, args.partitions),
            dtype=dtype,
            weights=args.weights,
            kv_dtype=args.kv_dtype,
            max_context=args.max_context,
        )
        sampling = SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop_token_ids=tokenizer.stop_token_ids,
        )
        t_loaded = time.perf_counter()
        print(
            f"loaded {config.architecture} ({dtype}, {args.partitions} partition(s)) "
            f"in {t_loaded - t0:.2f}s; prompt {len(prompt)} tokens",
            file=sys.stderr,
        )
        decoder = tokenizer.incremental_decoder()
        count, t_first = 0, None
        for token, _ in generate(chain, prompt, sampling, args.max_tokens):
            if t_first is None:
                t_first = time.perf_counter()
            count += 1
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()
        sys.stdout.write(decoder.flush())
        sys.stdout.flush()
        t_end = time.perf_counter()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ttft = (t_first or t_end) - t_loaded
    rate = (count - 1) / (t_end - t_first) if t_first and count > 1 else 0.0
    print(
        f"\n{count} tokens; first token after {ttft:.2f}s (includes compilation); "
        f"decode {rate:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
