"""CPU cost of llamahot's machinery: decode tok/s of stock llama_cpp.Llama vs llamahot.Llama.

All models are loaded side by side and decoded in interleaved repetitions (median reported), one
token per eval, after the same prompt. On a CPU build llamahot's experts sit in host memory, the
same placement as stock, so every difference is the cost of the mechanism:
  idle       the callback installed but never stopping the graph
  observing  hot_experts=0: one stop per MoE layer to count routing
  host slots hot_experts=K on host slots (default rebalance interval): every MoE layer's expert
             FFN of a decode step computed by the shim in one stop, hot experts from slot copies,
             cold ones from the original weights; "per-node" is the fallback path that stops at
             every expert matmul

    python benchmarks/cpu_cost.py [--preset gptoss-tiny] [--tokens 128] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np

import llamahot
from llamahot.synth import synth_model

PROMPT = b"def fibonacci(n):\n    if n < 2:\n        return n\n"


def decode_seconds(llm: llama_cpp.Llama, n_tokens: int) -> float:
    """Seconds spent in eval for n_tokens greedy single-token steps after the prompt."""
    llm.reset()
    llm.eval(llm.tokenize(PROMPT))
    spent = 0.0
    for _ in range(n_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        llm.eval([token])
        spent += time.perf_counter() - start
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="fixture preset (default: the largest MoE tiny preset)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="benchmarks/results/cpu_cost.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for name in ("qwen3moe-tiny", "deepseek2-tiny", "gptoss-tiny", "qwen3moe-mini"):
            sizes[name] = synth_model(Path(tmp) / f"{name}.gguf", name, seed=0)
        preset = args.preset or max(sizes, key=lambda n: sizes[n].stat().st_size)
        path = str(sizes[preset]) if preset in sizes else str(synth_model(Path(tmp) / f"{preset}.gguf", preset))
        size_mib = os.path.getsize(path) / 2**20
        # n_ctx covers the prompt plus every decoded token.
        kw = dict(n_ctx=args.tokens + 128, n_threads=args.threads, n_threads_batch=args.threads,
                  logits_all=True, verbose=False)
        idle = llamahot.Llama(path, hot_experts=0, **kw)
        idle.hot_cache.set_observing(False)
        layout = llamahot.read_moe_layout(path)
        modes = {
            "stock": llama_cpp.Llama(path, **kw),
            "llamahot callback idle": idle,
            "llamahot observing (K=0)": llamahot.Llama(path, hot_experts=0, **kw),
        }
        for k in sorted({layout.n_expert_used, layout.n_expert // 2, layout.n_expert}):
            modes[f"llamahot host slots K={k}"] = llamahot.Llama(path, hot_experts=k, slot_device="host", **kw)
        # The fallback path (one stop per expert matmul), for comparison.
        per_node = llamahot.Llama(path, hot_experts=layout.n_expert, slot_device="host", **kw)
        per_node.hot_cache.set_debug(per_node=True)
        modes[f"llamahot host slots K={layout.n_expert} per-node"] = per_node
        times = {mode: [] for mode in modes}
        for _ in range(args.reps):
            for mode, llm in modes.items():
                times[mode].append(decode_seconds(llm, args.tokens))
        observed = modes["llamahot observing (K=0)"].hot_cache.stats()
        slot_stats = {mode: llm.hot_cache.stats() for mode, llm in modes.items() if "slots" in mode}
        for llm in modes.values():
            llm.close()

    base = statistics.median(times["stock"])
    rows = []
    print(f"{preset} ({Path(path).name}, {size_mib:.1f} MiB), {args.tokens} decode tokens, "
          f"{args.reps} interleaved reps, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'mode':28s} {'tok/s (median)':>15s} {'vs stock':>9s}   all reps tok/s")
    for mode, secs in times.items():
        med = statistics.median(secs)
        rate = args.tokens / med
        rows.append({"mode": mode, "tok_s": rate, "ratio": base / med, "reps_tok_s": [args.tokens / s for s in secs]})
        print(f"{mode:28s} {rate:15.1f} {base / med:9.3f}   " + " ".join(f"{args.tokens / s:.1f}" for s in secs))
    print(f"llamahot counted {observed['tokens']} tokens in {observed['ubatches']} ubatches "
          f"({observed['managed_nodes']} MoE-layer stops)")
    for mode, st in slot_stats.items():
        print(f"{mode}: hit rate {st['hit_rate']:.3f}, {st['redirected_nodes']} expert matmuls redirected "
              f"({st['ffn_redirects']} layer FFNs in one stop), {st['rebalances']} rebalances, "
              f"{st['bytes_moved'] / 2**20:.1f} MiB moved, longest rebalance {st['max_rebalance_ms']:.1f} ms")
        rows_by_mode = {r["mode"]: r for r in rows}
        rows_by_mode[mode].update(hit_rate=st["hit_rate"], redirected_nodes=st["redirected_nodes"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"preset": preset, "tokens": args.tokens, "reps": args.reps,
                                          "threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
