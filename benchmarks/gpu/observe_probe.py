"""Probe: what reading the routing one decode step in n costs with the experts in place.

    python benchmarks/gpu/observe_probe.py MODEL.gguf --out DIR --text TEXT [--k 51] [--tokens 256]
        [--rows 16,64,100000] [--idle-row] [--stock-gpu-row] [--stock-idle-callback-row] [--stock-managed-row]

One llamahot.Llama in place (gpu_mode="managed") at K, started from a routing profile of the text's second
half (so the policy knows enough routing to read one step in n from the first token); teacher-forced decode
over windows of the text's first half, rows interleaved and rotated: one step in n for each n of --rows
(100000: almost never, the floor of reading). --idle-row: the callback installed but idle (nothing read);
--stock-gpu-row: stock llama_cpp.Llama with the whole model on the GPU (with --k n_expert, what in place
costs beyond its hot set); --stock-managed-row: the same with its weights in CUDA managed memory. Prints
median tok/s per row and each window's slowest steps. (Session 20 ran it with rows with and without the
shim's split-start stops; session 21 again, 'N:no split-start stops': benchmarks/RESULTS.md.)
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import llama_cpp  # (before cuda.bindings: docs/NOTES.md, import order on the device)

import llamahot
from llamahot.benchmark import decode_step_times, eval_without_after_work
from llamahot.llama import UNIFIED_MEMORY_ENV

sys.path.insert(0, str(Path(__file__).parent))
from probe_common import llama_kw, probe_arguments, record_second_half, text_windows  # noqa: E402


def main() -> int:
    ap = probe_arguments(__doc__, tokens=256)
    ap.add_argument("--profile-windows", type=int, default=40)
    ap.add_argument("--slot-device", default="cuda", help="emulated-gpu: a dry run on a CPU machine")
    ap.add_argument("--rows", default="16,64,100000",
                    help="read the routing of one decode step in n, per row ('NxB': B steps in a row in every N * "
                         "B); 'N:no split-start stops' the same "
                         "without the shim's split-start stops (set_debug(no_split_start_stops=True)); 'N:stay "
                         "hooked' with the callback kept on unread steps (set_debug(stay_hooked=True)); 'idle' the "
                         "callback idle; ':raw eval' after either: steps through llama_cpp.Llama.eval (no "
                         "llamahot after-eval work but its before-eval call)")
    ap.add_argument("--idle-row", action="store_true", help="a row with the callback idle (set_observing(False))")
    ap.add_argument("--stock-gpu-row", action="store_true", help="a row of stock llama_cpp.Llama, all on the GPU")
    ap.add_argument("--stock-idle-callback-row", action="store_true",
                    help="a row of stock llama_cpp.Llama, all on the GPU, with an idle C eval callback "
                         "(callback_probe.py's): what llama.cpp's callback path alone costs")
    ap.add_argument("--stock-managed-row", action="store_true",
                    help="a row of stock llama_cpp.Llama, all on the GPU, its weights in CUDA managed memory "
                         "(GGML_CUDA_ENABLE_UNIFIED_MEMORY=1 while it loads; what managed memory alone costs)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = llama_kw(args.threads)
    tmp = Path(tempfile.mkdtemp())
    profile = tmp / "profile.npz"
    windows = text_windows(args.model, args.text, args.tokens)
    recorded = record_second_half(args.model, windows, args.profile_windows, profile, args.threads, args.slot_device)
    shutil.copy(profile, out / "profile.npz")
    llm = llamahot.Llama(args.model, hot_experts=args.k, slot_device=args.slot_device, gpu_mode="managed",
                         routing_profile=profile, **kw)
    cache = llm.hot_cache
    rows: list = [n for n in args.rows.split(",") if n] + (["idle"] if args.idle_row else [])
    stock = None
    if args.stock_gpu_row:
        stock = llama_cpp.Llama(args.model, **kw)
        rows.append("stock")
    stock_idle = None
    if args.stock_idle_callback_row:
        from callback_probe import WithCallback, address, probe_library
        stock_idle = WithCallback(args.model, callback=address(probe_library().idle_callback), **kw)
        rows.append("stock idle callback")
    stock_managed = None
    if args.stock_managed_row:
        os.environ[UNIFIED_MEMORY_ENV] = "1"
        stock_managed = llama_cpp.Llama(args.model, **kw)
        del os.environ[UNIFIED_MEMORY_ENV]
        rows.append("stock managed")
    samples: dict[str, list[float]] = {}
    step_ms: dict[str, list[list[float]]] = {}   # every step's time, per window
    hit_rates: dict[str, list[float]] = {}
    for rep, window in enumerate(windows[: args.windows]):
        for row in rows[rep % len(rows):] + rows[:rep % len(rows)]:
            if row == "stock":
                name = "stock llama_cpp.Llama, all on the GPU"
                times = decode_step_times(stock, args.tokens, text_tokens=window)
            elif row == "stock idle callback":
                name = "stock llama_cpp.Llama, all on the GPU, idle C callback"
                times = decode_step_times(stock_idle, args.tokens, text_tokens=window)
            elif row == "stock managed":
                name = "stock llama_cpp.Llama, all on the GPU, weights in managed memory"
                times = decode_step_times(stock_managed, args.tokens, text_tokens=window)
            else:
                every, _, variant = str(row).partition(":")
                idle = every == "idle"
                n, _, burst = every.partition("x")   # 'NxB': B steps in a row in every N * B
                name = ("callback idle" if idle else f"one step in {n}" + (f", bursts of {burst}" if burst else "")) \
                    + (f", {variant}" if variant else "")
                cache.set_observing(not idle)
                cache.set_observe_every(1 if idle else int(n), burst=int(burst or 1))
                cache.set_debug(no_split_start_stops=variant == "no split-start stops",
                                stay_hooked=variant == "stay hooked")
                raw = eval_without_after_work(llm) if variant == "raw eval" else None
                cache.reset()   # (hits of the steps read, and the prompt's)
                times = decode_step_times(llm, args.tokens, text_tokens=window, eval_step=raw)
                stats = cache.stats()
                hit_rates.setdefault(name, []).append(stats["hits"] / max(stats["hits"] + stats["misses"], 1))
            rate = len(times) / sum(times)
            samples.setdefault(name, []).append(rate)
            step_ms.setdefault(name, []).append([t * 1e3 for t in times])
            slowest = sorted(range(len(times)), key=lambda i: -times[i])[:6]
            print(f"  window {rep}: {name}: {rate:.1f} tok/s; median step {statistics.median(times) * 1e3:.2f} ms, "
                  f"slowest steps " + ", ".join(f"#{i} {times[i] * 1e3:.1f}" for i in sorted(slowest)), flush=True)
    llm.close()
    for other in (stock, stock_idle, stock_managed):
        if other is not None:
            other.close()
    print(f"\nK={args.k} in place with a profile of {recorded} windows, {args.tokens} tokens x "
          f"{args.windows} windows ({os.uname().nodename})\n")
    print("| routing read | decode tok/s (median) | samples | hit rate of the steps read (median) |\n|---|---|---|---|")
    for name, values in samples.items():
        hits = f"{statistics.median(hit_rates[name]):.3f}" if name in hit_rates else ""
        print(f"| {name} | {statistics.median(values):.1f} | {' / '.join(f'{v:.1f}' for v in values)} | {hits} |")
    (out / "observe_probe.json").write_text(json.dumps({"samples": samples, "step_ms": step_ms,
                                                        "hit_rates": hit_rates}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
