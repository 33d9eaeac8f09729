"""Stock llama-cpp-python vs llamahot on one model, side by side: decode tok/s and hit rate.

    python examples/bench.py MODEL.gguf [--hot-experts 16,44] [--tokens 128] [--reps 3]

Stock keeps every routed expert in RAM like `-ot exps=CPU` (a llamahot.Llama with K=0 and its
callback idle); each llamahot row adds K hot-expert slots per layer. The models take turns, medians
are printed. Same as `llamahot bench`. For the full GPU suite (static offload at equal VRAM,
roofline) see benchmarks/gpu/.
"""
from __future__ import annotations

import argparse
import sys

from llamahot.benchmark import compare, format_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--hot-experts", default="16,44", help="comma-separated K values")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n-ctx", type=int, default=2048)
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.hot_experts.split(",")]
    print(format_rows(compare(args.model, ks, tokens=args.tokens, reps=args.reps, n_ctx=args.n_ctx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
