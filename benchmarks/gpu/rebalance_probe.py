"""Where a rebalance's time goes on the GPU machine: cProfile around HotCache.rebalance during
teacher-forced decode over held-out code, rebalancing every token (the policy variant whose hit rate
is highest and whose rebalances cost the most).

    python benchmarks/gpu/rebalance_probe.py MODEL.gguf [--k 51] [--tokens 64]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import llamahot
from llamahot.benchmark import decode_rate
from llamahot.hot_cache import HotCache
from llamahot.model_info import read_moe_layout
from llamahot.policy import DecayedFrequency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--k", type=int, default=51)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    layout = read_moe_layout(args.model)
    llm = llamahot.Llama(args.model, hot_experts=args.k, rebalance_interval=1, slot_device="cuda",
                         n_gpu_layers=-1, n_ctx=2048, n_threads=16, verbose=False)
    llm.hot_cache.policy = DecayedFrequency(layout.n_moe_layers, layout.n_expert, args.k, half_life=8, margin=0)
    text = llm.tokenize(Path("benchmarks/data/heldout_code.txt").read_text().encode(), add_bos=False)
    profile = cProfile.Profile()
    original = HotCache.rebalance

    def profiled(self):
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    HotCache.rebalance = profiled
    decode_rate(llm, args.tokens, text_tokens=text[: 16 + args.tokens])  # warm-up, first fill
    profile = cProfile.Profile()
    llm.hot_cache.reset()
    start = time.perf_counter()
    rate = decode_rate(llm, args.tokens, text_tokens=text[200: 216 + args.tokens])
    stats = llm.hot_cache.stats()
    print(f"{rate:.1f} tok/s, hit rate {stats['hit_rate']:.3f}, {stats['experts_loaded'] / args.tokens:.1f} loads/token, "
          f"rebalance {stats['rebalance_ms'] / max(stats['rebalances'], 1):.2f} ms each ({stats['rebalances']}), "
          f"copies batched: {getattr(llm.hot_cache.slots.copies, 'batch', None)}, {time.perf_counter() - start:.1f} s")
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)
    llm.close()


if __name__ == "__main__":
    main()
