"""CLI over node.tinymodel.make_tiny_model: write a tiny random HF-format model to a directory."""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout too

from node.testing.tinymodel import ARCHS, DTYPES, make_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a tiny random Llama/Qwen2 checkpoint (HF format)."
    )
    parser.add_argument(
        "out_dir", type=pathlib.Path, help="directory to write (created if missing)"
    )
    parser.add_argument("--arch", choices=ARCHS, default="llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument(
        "--vocab", type=int, default=512, help="vocabulary size, special tokens included"
    )
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--seed", type=int, default=0)
    tie = parser.add_mutually_exclusive_group()
    tie.add_argument(
        "--tie", dest="tie", action="store_true", default=None, help="tie lm_head to the embedding"
    )
    tie.add_argument("--no-tie", dest="tie", action="store_false", help="separate lm_head")
    args = parser.parse_args(argv)
    try:
        out = make_tiny_model(
            args.out_dir,
            arch=args.arch,
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate=args.intermediate,
            vocab_size=args.vocab,
            shards=args.shards,
            dtype=args.dtype,
            seed=args.seed,
            tie_word_embeddings=args.tie,
        )
    except (ValueError, OSError) as exc:
        print(f"make_tiny_model: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
