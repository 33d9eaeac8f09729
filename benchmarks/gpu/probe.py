"""Quick GPU probe: decode tok/s of a few modes on one model (a first look, not the #4 suite).

    python benchmarks/gpu/probe.py MODEL.gguf [--tokens 128]
"""
from __future__ import annotations

import argparse
import json
import time

import llama_cpp
import numpy as np

import llamahot

PROMPT = b"def fibonacci(n):\n    if n < 2:\n        return n\n"


def decode(llm, n: int) -> tuple[float, list[int]]:
    llm.reset()
    llm.eval(llm.tokenize(PROMPT))
    tokens, spent = [], 0.0
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        tokens.append(int(np.argmax(logits)))
        start = time.perf_counter()
        llm.eval([tokens[-1]])
        spent += time.perf_counter() - start
    return n / spent, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--ks", default="8,16,32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    kw = dict(n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    results = {}
    runs = [("stock all-on-GPU", lambda: llama_cpp.Llama(args.model, n_gpu_layers=-1, **kw), None)]
    runs.append(("experts in RAM, callback idle", lambda: llamahot.Llama(args.model, hot_experts=0, slot_device="cuda", **kw), "idle"))
    runs.append(("experts in RAM, observing", lambda: llamahot.Llama(args.model, hot_experts=0, slot_device="cuda", **kw), None))
    for k in map(int, args.ks.split(",")):
        runs.append((f"llamahot cuda K={k}", lambda k=k: llamahot.Llama(args.model, hot_experts=k, slot_device="cuda", **kw), None))
        runs.append((f"llamahot cuda K={k} per-node", lambda k=k: llamahot.Llama(args.model, hot_experts=k, slot_device="cuda", **kw), "per-node"))
    reference = None
    for name, make, variant in runs:
        llm = make()
        if variant == "idle":
            llm.hot_cache.set_observing(False)
        if variant == "per-node":
            llm.hot_cache.set_debug(per_node=True)
        decode(llm, 16)  # warm-up and first fill
        if isinstance(llm, llamahot.Llama):
            llm.hot_cache.reset()
        rates = []
        for _ in range(3):
            rate, tokens = decode(llm, args.tokens)
            rates.append(rate)
        row = {"tok_s": float(np.median(rates)), "reps": rates}
        if name.startswith("experts in RAM, observing"):
            reference = tokens
        if reference is not None:
            row["tokens_match_ram"] = sum(a == b for a, b in zip(tokens, reference))
        if isinstance(llm, llamahot.Llama):
            st = llm.hot_cache.stats()
            n = max(st["decode_tokens"], 1)
            row.update({key: st[key] for key in ("hit_rate", "redirected_nodes", "ffn_redirects", "bytes_moved",
                                                 "rebalances", "max_rebalance_ms", "slot_bytes")})
            row.update({f"{key}_per_token": st[key] / n for key in ("redirect_ms", "cpu_compute_ms", "gpu_submit_ms",
                                                                    "gpu_wait_ms")})
        results[name] = row
        print(name, json.dumps(row), flush=True)
        llm.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
