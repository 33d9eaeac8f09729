"""The real case of gpu_mode="managed": a model larger than the free VRAM.

    python benchmarks/gpu/oversub_probe.py MODEL --out DIR --free-gib 10 --k 51 --text T [--profile P]

1. Stock all-on-GPU (while the whole VRAM is free): greedy logits, the reference in place must match.
2. A cudaMalloc blocker leaves --free-gib free (the model's experts then cannot all fit).
3. Under the blocker: stock experts-in-RAM, llamahot in place (managed, K, the profile if given) and
   llamahot redirect (K), each loaded (timed), greedy logits compared with the reference (in place:
   bit for bit; the others: the stock RAM tokens), then teacher-forced decode over windows of the text.
Prints a table and writes DIR/oversub.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp  # before cuda.bindings (docs/NOTES.md: the other order crashed in print_info)
import numpy as np

import llamahot
from llamahot.benchmark import StockPlaced, decode_rate, greedy_run
from llamahot.model_info import EXPERT_TENSOR_PATTERN


def free_gib() -> float:
    from llamahot.slots import free_vram_bytes
    return free_vram_bytes() / 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--free-gib", type=float, default=10.0)
    parser.add_argument("--k", type=int, default=51)
    parser.add_argument("--text", required=True)
    parser.add_argument("--profile", default=None, help="a routing profile for the in-place instance")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--steps", type=int, default=64, help="greedy steps compared")
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=args.threads, n_threads_batch=args.threads,
              n_gpu_layers=-1, verbose=False)
    result: dict = {"model": Path(args.model).name, "k": args.k, "free_gib_target": args.free_gib, "rows": {}}

    def save() -> None:
        (out / "oversub.json").write_text(json.dumps(result, indent=2, default=float) + "\n")

    t0 = time.perf_counter()
    gpu = StockPlaced(args.model, cpu_pattern=None, **kw)
    ref_tokens, ref_logits = greedy_run(gpu, args.steps)
    text_ids = gpu.tokenize(Path(args.text).read_bytes(), add_bos=False)
    size = 16 + args.tokens
    windows = [text_ids[i * size:(i + 1) * size] for i in range(args.windows)]
    gpu_rates = [decode_rate(gpu, args.tokens, text_tokens=w) for w in windows]
    gpu.close()
    result["stock_gpu_decode_tok_s"] = statistics.median(gpu_rates)
    print(f"stock GPU: reference made in {time.perf_counter() - t0:.1f} s, decode {statistics.median(gpu_rates):.1f} tok/s; "
          f"free VRAM {free_gib():.2f} GiB", flush=True)

    from cuda.bindings import runtime as cudart
    block = int((free_gib() - args.free_gib) * 2**30)
    err, blocker = cudart.cudaMalloc(block)
    assert err == cudart.cudaError_t.cudaSuccess, err
    result["blocker_gib"] = block / 2**30
    result["free_gib_under_blocker"] = free_gib()
    print(f"blocker: {block / 2**30:.2f} GiB held, {free_gib():.2f} GiB free", flush=True)
    save()

    def profile_copy(name: str):   # each instance its own copy: closing one adds to it
        if args.profile is None:
            return None
        copy = Path(tempfile.mkdtemp(prefix="llamahot-oversub-")) / f"{name}.npz"
        copy.write_bytes(Path(args.profile).read_bytes())
        return copy

    cases = [("stock RAM", lambda: StockPlaced(args.model, cpu_pattern=EXPERT_TENSOR_PATTERN, **kw)),
             (f"llamahot K={args.k} in place" + (" + profile" if args.profile else ""),
              lambda: llamahot.Llama(args.model, hot_experts=args.k, slot_device="cuda", gpu_mode="managed",
                                     routing_profile=profile_copy("managed"), **kw)),
             (f"llamahot K={args.k} redirect" + (" + profile" if args.profile else ""),
              lambda: llamahot.Llama(args.model, hot_experts=args.k, slot_device="cuda", gpu_mode="redirect",
                                     routing_profile=profile_copy("redirect"), **kw))]
    ram_tokens = None
    for name, make in cases:
        row: dict = {}
        result["rows"][name] = row
        t1 = time.perf_counter()
        try:
            llm = make()
        except Exception as exc:   # the point of the probe: say what happened, go on
            row["error"] = repr(exc)
            print(f"{name}: load failed: {exc!r}", flush=True)
            save()
            continue
        row["load_s"] = time.perf_counter() - t1
        row["free_gib_after_load"] = free_gib()
        tokens, logits = greedy_run(llm, args.steps)
        if name == "stock RAM":
            ram_tokens = tokens
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        row["greedy_identical_to_stock_gpu"] = same
        row["logits_bit_identical_to_stock_gpu"] = bool((logits.view(np.uint32) == ref_logits.view(np.uint32)).all())
        if ram_tokens is not None:
            row["greedy_identical_to_stock_ram"] = next(
                (i for i, (a, b) in enumerate(zip(tokens, ram_tokens)) if a != b), len(tokens))
        rates = []
        for w in windows:
            if isinstance(llm, llamahot.Llama):
                llm.hot_cache.reset()
            rates.append(decode_rate(llm, args.tokens, text_tokens=w,
                                     after_prompt=lambda m: m.hot_cache.reset() if isinstance(m, llamahot.Llama) else None))
            if isinstance(llm, llamahot.Llama):
                row.setdefault("hit_rate", []).append(llm.hot_cache.stats()["hit_rate"])
        row["decode_tok_s"] = rates
        row["decode_median"] = statistics.median(rates)
        row["free_gib_after_decode"] = free_gib()
        llm.close()
        print(f"{name}: load {row['load_s']:.1f} s, greedy identical to stock GPU for {same}/{args.steps}, logits "
              f"bit-identical {row['logits_bit_identical_to_stock_gpu']}, decode {['%.1f' % r for r in rates]} tok/s"
              + (f", hit {['%.3f' % h for h in row['hit_rate']]}" if "hit_rate" in row else "")
              + f"; free VRAM after load {row['free_gib_after_load']:.2f} GiB", flush=True)
        save()
    cudart.cudaFree(blocker)
    base = result["rows"].get("stock RAM", {}).get("decode_median")
    print("| row | load s | decode tok/s (median) | vs stock RAM | greedy = stock GPU | bit-identical |")
    print("|---|---|---|---|---|---|")
    for name, row in result["rows"].items():
        if "error" in row:
            print(f"| {name} | failed: {row['error'][:80]} | | | | |")
            continue
        ratio = row["decode_median"] / base if base else float("nan")
        print(f"| {name} | {row['load_s']:.1f} | {row['decode_median']:.1f} | {ratio:.3f} | "
              f"{row['greedy_identical_to_stock_gpu']}/{args.steps} | {row['logits_bit_identical_to_stock_gpu']} |")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
