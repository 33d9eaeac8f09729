"""CPU cost of llamahot's machinery: decode tok/s of stock llama_cpp.Llama vs llamahot.Llama.

All models are loaded side by side and take turns token by token (see paired_decode_times); the
table gives median tok/s and the median of per-step paired ratios. On a CPU build llamahot's experts sit in host memory, the
same placement as stock, so every difference is the cost of the mechanism:
  idle       the callback installed but never stopping the graph
  observing  hot_experts=0: one stop per MoE layer to count routing
  host slots hot_experts=K on host slots (default rebalance interval): every MoE layer's expert
             FFN of a decode step computed by the shim in one stop, hot experts from slot copies,
             cold ones from the original weights; "per-node" is the fallback path that stops at
             every expert matmul

    python benchmarks/cpu_cost.py [--preset qwen3moe-mini] [--tokens 1024] [--restart 256]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np

import llamahot
from llamahot.synth import synth_model

PROMPT = b"def fibonacci(n):\n    if n < 2:\n        return n\n"


def paired_decode_times(modes: dict, n_tokens: int, restart_every: int) -> dict[str, np.ndarray]:
    """Seconds of each single-token eval, modes taking turns token by token (order rotated).

    Every mode decodes its own greedy continuation of the same prompt; all restart from the prompt
    every `restart_every` tokens (prompts are not timed). Taking turns per token means background
    load on a small machine hits every mode alike, so paired ratios are far steadier than ratios of
    separate runs.
    """
    times = {mode: [] for mode in modes}
    order = list(modes)
    for step in range(n_tokens):
        if step % restart_every == 0:
            for llm in modes.values():
                llm.reset()
                llm.eval(llm.tokenize(PROMPT))
        shift = step % len(order)
        for mode in order[shift:] + order[:shift]:
            llm = modes[mode]
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            start = time.perf_counter()
            llm.eval([token])
            times[mode].append(time.perf_counter() - start)
    return {mode: np.array(t) for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3moe-mini", help="fixture preset (default: the largest test fixture)")
    parser.add_argument("--tokens", type=int, default=1024, help="decode tokens per mode")
    parser.add_argument("--restart", type=int, default=256, help="tokens between restarts from the prompt")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="benchmarks/results/cpu_cost.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = str(synth_model(Path(tmp) / f"{args.preset}.gguf", args.preset, seed=0))
        preset = args.preset
        size_mib = os.path.getsize(path) / 2**20
        # n_ctx covers the prompt plus every decoded token.
        kw = dict(n_ctx=args.restart + 128, n_threads=args.threads, n_threads_batch=args.threads,
                  logits_all=True, verbose=False)
        idle = llamahot.Llama(path, hot_experts=0, slot_device="host", **kw)
        idle.hot_cache.set_observing(False)
        layout = llamahot.read_moe_layout(path)
        modes = {
            "stock": llama_cpp.Llama(path, **kw),
            "llamahot callback idle": idle,
            "llamahot observing (K=0)": llamahot.Llama(path, hot_experts=0, slot_device="host", **kw),
        }
        for k in sorted({layout.n_expert_used, layout.n_expert // 2, layout.n_expert}):
            modes[f"llamahot host slots K={k}"] = llamahot.Llama(path, hot_experts=k, slot_device="host", **kw)
        # The fallback path (one stop per expert matmul), for comparison.
        per_node = llamahot.Llama(path, hot_experts=layout.n_expert, slot_device="host", **kw)
        per_node.hot_cache.set_debug(per_node=True)
        modes[f"llamahot host slots K={layout.n_expert} per-node"] = per_node
        for llm in modes.values():
            if isinstance(llm, llamahot.Llama):
                llm.hot_cache.reset()
        times = paired_decode_times(modes, args.tokens, args.restart)
        observed = modes["llamahot observing (K=0)"].hot_cache.stats()
        slot_stats = {mode: llm.hot_cache.stats() for mode, llm in modes.items() if "slots" in mode}
        for llm in modes.values():
            llm.close()

    base = times["stock"]
    rows = []
    print(f"{preset} ({Path(path).name}, {size_mib:.1f} MiB), {args.tokens} decode tokens per mode taking turns "
          f"token by token, restart every {args.restart}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'mode':36s} {'tok/s':>8s} {'vs stock':>9s} {'paired ratio (25%-75%)':>24s}")
    for mode, secs in times.items():
        paired = base / secs  # same step, same moment: background load cancels
        q25, q50, q75 = np.percentile(paired, [25, 50, 75])
        rows.append({"mode": mode, "tok_s": 1 / np.median(secs), "ratio": float(np.median(base) / np.median(secs)),
                     "paired_ratio_median": float(q50), "paired_ratio_q25": float(q25), "paired_ratio_q75": float(q75)})
        print(f"{mode:36s} {1 / np.median(secs):8.1f} {np.median(base) / np.median(secs):9.3f} "
              f"{q50:10.3f} ({q25:.3f}-{q75:.3f})")
    print(f"llamahot counted {observed['tokens']} tokens in {observed['ubatches']} ubatches "
          f"({observed['managed_nodes']} MoE-layer stops)")
    for mode, st in slot_stats.items():
        print(f"{mode}: hit rate {st['hit_rate']:.3f}, {st['redirected_nodes']} expert matmuls redirected "
              f"({st['ffn_redirects']} layer FFNs in one stop), {st['rebalances']} rebalances, "
              f"{st['bytes_moved'] / 2**20:.1f} MiB moved, longest rebalance {st['max_rebalance_ms']:.1f} ms")
        rows_by_mode = {r["mode"]: r for r in rows}
        rows_by_mode[mode].update(hit_rate=st["hit_rate"], redirected_nodes=st["redirected_nodes"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"preset": preset, "tokens": args.tokens, "restart": args.restart,
                                          "threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
