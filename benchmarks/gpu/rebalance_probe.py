"""Where a rebalance's time goes on the GPU machine, and what the machine does to it.

Teacher-forced decode over held-out code at K slots with a policy (default: every token, half-life 8,
the variant whose hit rate is highest and whose rebalances cost the most). Prints decode tok/s, hit
rate, per-token ms of rebalances and of cold CPU compute; then the same policy work timed alone, with
llama's threads idle (the machine's plain speed for it); with --profile, cProfile around the
rebalances; with --settle-ms, a sleep before each rebalance (is it slow because of the threads that
spin right after a decode?). Run it under different OMP_WAIT_POLICY / GOMP_SPINCOUNT to compare.

    python benchmarks/gpu/rebalance_probe.py MODEL.gguf [--k 51] [--tokens 64] [--policy hl8|default|lru]
"""
from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path

import llamahot  # before numpy: numpy first made the device's CUDA build of llama_cpp die silently at load
from llamahot.benchmark import decode_rate
from llamahot.hot_cache import HotCache
from llamahot.model_info import read_moe_layout
from llamahot.policy import LRU, DecayedFrequency
from llamahot.slots import plan_loads

import numpy as np  # noqa: E402 (after llamahot, see above)

from bench import omp_env, probe_parser


def timed_us(fn, n: int = 50) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples) * 1e6)


def main() -> None:
    parser = probe_parser(__doc__)
    parser.add_argument("--policy", choices=("hl8", "default", "lru"), default="hl8")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--settle-ms", type=float, default=0.0)
    parser.add_argument("--plan-ahead", action="store_true", help="plan in a worker thread during the next eval")
    args = parser.parse_args()
    layout = read_moe_layout(args.model)
    interval = 4 if args.policy == "default" else 1
    llm = llamahot.Llama(args.model, hot_experts=args.k, rebalance_interval=interval, slot_device=args.slot_device,
                         gpu_mode="redirect",
                         n_gpu_layers=-1, n_ctx=2048, n_threads=args.threads, verbose=False)
    policy = {"hl8": lambda: DecayedFrequency(layout.n_moe_layers, layout.n_expert, args.k, half_life=8, margin=0),
              "lru": lambda: LRU(layout.n_moe_layers, layout.n_expert, args.k),
              "default": lambda: llm.hot_cache.policy}[args.policy]()
    llm.hot_cache.use_policy(policy, plan_ahead=args.plan_ahead)
    text = llm.tokenize(Path("benchmarks/data/heldout_code.txt").read_text().encode(), add_bos=False)
    profile = cProfile.Profile()
    original = HotCache.rebalance

    def wrapped(self, *rebalance_args, **rebalance_kwargs):
        if args.settle_ms:
            time.sleep(args.settle_ms / 1e3)
        if args.profile:
            profile.enable()
        try:
            original(self, *rebalance_args, **rebalance_kwargs)
        finally:
            if args.profile:
                profile.disable()

    HotCache.rebalance = wrapped
    decode_rate(llm, args.tokens, text_tokens=text[: 16 + args.tokens])  # warm-up, first fill
    profile = cProfile.Profile()
    llm.hot_cache.reset()
    rate = decode_rate(llm, args.tokens, text_tokens=text[200: 216 + args.tokens])
    s = llm.hot_cache.stats()
    n = max(s["decode_tokens"], 1)
    print(f"[{args.policy}, {args.threads} threads, {'planned ahead' if args.plan_ahead else 'synchronous'}, settle {args.settle_ms} ms, "
          f"{omp_env()}] "
          f"{rate:.1f} tok/s (settle sleeps inside), hit {s['hit_rate']:.3f}, "
          f"{s['experts_loaded'] / n:.1f} loads/token, rebalance {s['rebalance_ms'] / n:.2f} ms/token "
          f"({s['rebalance_ms'] / max(s['rebalances'], 1):.2f} each), cold CPU {s['cpu_compute_ms'] / n:.2f} ms/token, "
          f"GPU submit {s['gpu_submit_ms'] / n:.2f}, GPU wait {s['gpu_wait_ms'] / n:.2f}; "
          f"CPU runs {s['cpu_runs'] / n:.1f}/token, CPU rows {s['cpu_rows'] / n:.1f}/token")
    # The same policy work alone, llama's threads long idle.
    time.sleep(0.5)
    cache = llm.hot_cache
    resident = cache.slots.resident()
    desired = cache.policy.choose(resident)
    print(f"  alone: resident() {timed_us(cache.slots.resident):.0f} us, choose {timed_us(lambda: cache.policy.choose(resident)):.0f} us, "
          f"plan_loads {timed_us(lambda: plan_loads(desired, cache.slots.expert_of_slot, resident)):.0f} us")
    if args.profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(14)
    llm.close()


if __name__ == "__main__":
    main()
