"""Stock llama-cpp-python vs llamahot on one model, side by side: decode tok/s and hit rate.

    python examples/bench.py MODEL.gguf [--hot-experts 16,44] [--tokens 128] [--reps 3]

Stock keeps every routed expert in RAM like `-ot exps=CPU` would (llamahot with the callback idle);
each llamahot row adds K hot-expert slots per layer. The models take turns, medians are printed.
For the full GPU suite (static offload at equal VRAM, roofline) see benchmarks/gpu/.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import llama_cpp
import numpy as np

from llamahot import Llama

PROMPT = b"def fibonacci(n):\n    if n < 2:\n        return n\n"


def decode_rate(llm, n: int) -> float:
    llm.reset()
    llm.eval(llm.tokenize(PROMPT))
    spent = 0.0
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        start = time.perf_counter()
        llm.eval([token])
        spent += time.perf_counter() - start
    return n / spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--hot-experts", default="16,44", help="comma-separated K values")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n-ctx", type=int, default=2048)
    args = parser.parse_args(argv)

    stock = Llama(args.model, hot_experts=0, n_ctx=args.n_ctx, verbose=False)
    stock.hot_cache.set_observing(False)  # experts in RAM, callback installed but idle: stock speed
    runs = {"stock (experts in RAM)": stock}
    for k in (int(k) for k in args.hot_experts.split(",")):
        runs[f"llamahot K={k}"] = Llama(args.model, hot_experts=k, n_ctx=args.n_ctx, verbose=False)
    rates = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, llm in runs.items():
            rates[name].append(decode_rate(llm, args.tokens))
    base = statistics.median(rates["stock (experts in RAM)"])
    print(f"{'mode':28s} {'decode tok/s':>12s} {'vs stock':>9s} {'hit rate':>9s}")
    for name, llm in runs.items():
        rate = statistics.median(rates[name])
        hit = f"{llm.hot_cache.stats()['hit_rate']:.1%}" if llm.hot_cache.hot_experts else "-"
        print(f"{name:28s} {rate:12.1f} {rate / base:9.3f} {hit:>9s}")
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
