"""Hit rate vs K for every policy and the offline optimum (Belady with bypass), on a routing trace
recorded by teacher-forced decoding of text, plus the trace's routing statistics.

    python benchmarks/policies.py MODEL.gguf [--text FILE] [--tokens 1024] [--interval 60]

Without --text the generator's embedded code corpus is used. Random-weight models route almost
uniformly, so their curves sit near K/n_expert; the trained model of issue #5 is where this matters.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import llamahot
from llamahot.policy import POLICIES, make_policy, replay
from llamahot.routing_stats import QWEN3_30B_A3B, belady, report


def record_trace(model: str, text: str, n_tokens: int) -> np.ndarray:
    """Routing of each token when the model reads `text` one token at a time (teacher forcing)."""
    llm = llamahot.Llama(model, hot_experts=0, slot_device="host", n_ctx=n_tokens + 8, verbose=False)
    tokens = llm.tokenize(text.encode())[:n_tokens]
    rows, before = [], llm.hot_cache.routing_counts()
    for token in tokens:
        llm.eval([token])
        after = llm.hot_cache.routing_counts()
        rows.append(after - before)
        before = after
    llm.close()
    return np.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--text", help="a text file to read (default: the generator's code corpus)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--interval", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/results/policies.json")
    args = parser.parse_args()
    if args.text:
        text = Path(args.text).read_text()
    else:
        from llamahot.synth import _CORPUS
        text = _CORPUS * 4
    trace = record_trace(args.model, text, args.tokens)
    n_expert = trace.shape[2]
    stats = report(trace)["mean"]
    print(f"{Path(args.model).name}: {len(trace)} tokens, {trace.shape[1]} MoE layers x {n_expert} experts")
    print("routing: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items())
          + f"   (Qwen3-30B-A3B published: next-token reuse {QWEN3_30B_A3B['next_token_reuse']}, within 8 "
            f"{QWEN3_30B_A3B['reuse_within_8']}, 90 % of routing on {QWEN3_30B_A3B['experts_for_90pct']} of experts)")
    ks = sorted({max(1, n_expert // 8), n_expert // 4, n_expert * 2 // 5, n_expert // 2, n_expert * 3 // 4})
    rows = {}
    print(f"{'K':>5s} " + " ".join(f"{name:>11s}" for name in [*POLICIES, "belady"]))
    for k in ks:
        row = {name: replay(make_policy(name, trace.shape[1], n_expert, k, args.interval), trace,
                            args.interval)["hit_rate"] for name in POLICIES}
        row["belady"] = belady(trace[args.interval:], k)["hit_rate"]  # the same tokens replay() scores
        rows[k] = row
        print(f"{k:5d} " + " ".join(f"{row[name]:11.3f}" for name in [*POLICIES, "belady"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": Path(args.model).name, "tokens": len(trace),
                                          "interval": args.interval, "routing": stats, "hit_rate": rows},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
