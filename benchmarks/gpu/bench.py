"""The GPU suite of issue #4: correctness of llamahot on CUDA slots against stock llama-cpp-python, and
a decode/prefill speed table against stock placements, with the roofline of a hot-expert cache.

    python benchmarks/gpu/bench.py MODEL.gguf --out DIR [--ks 16,32,64,96,128] [--reps 3]

Modes (16 threads, n_ctx 2048, ubatch 512):
  stock RAM      llama_cpp.Llama, every routed-expert tensor in host memory (`-ot exps=CPU`), rest on GPU
  stock static   llama_cpp.Llama with the experts of the last G layers on the GPU and the others in host
                 memory (like `--n-cpu-moe`), G chosen so the experts on the GPU take the VRAM of K slots
  llamahot K     llamahot.Llama(hot_experts=K, slot_device="cuda", gpu_mode=--gpu-mode) — one instance, K
                 changed in place (--redirect-row: also a second instance with gpu_mode="redirect" at each K)
  llamahot idle  the same instance with K = 0 and the callback never stopping
  stock GPU      llama_cpp.Llama, everything on the GPU
Per K, the modes take turns (order rotated) for `reps` repetitions of: a short prompt then `--tokens`
single-token decode steps, and a 512-token prefill. Medians are reported.

Roofline: T(h) = T_gpu + (1 - h) * T_cold, with T_gpu the per-token decode time of stock GPU and
T_cold = T_ram - T_gpu (what moving every expert to the CPU adds to a token), h the measured hit rate.
On a CPU-only build the same script runs with host slots (a dry run of its logic, not a benchmark).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np

import llamahot
from llamahot.benchmark import PROMPT as SHORT_PROMPT
from llamahot.benchmark import (StockPlaced, decode_rate, decode_step_times, eval_without_after_work, finish,
                                greedy_run, last_logits)
from llamahot.model_info import EXPERT_TENSOR_PATTERN, MoELayout, read_moe_layout
from llamahot.policy import LRU, DecayedFrequency
from llamahot.profile import record_profile



def static_cpu_pattern(n_layers_on_cpu: int, layout: MoELayout) -> str | None:
    """Regex putting the experts of the first `n_layers_on_cpu` MoE layers in host memory (the
    placement llamahot gives its managed layers with the others resident)."""
    if n_layers_on_cpu == 0:
        return None
    return layout.without_last(layout.n_moe_layers - n_layers_on_cpu).expert_pattern()


def static_layers_for(k: int, layout: MoELayout) -> int:
    """MoE layers whose experts fit in the VRAM of K slots in every layer (static offload at equal VRAM)."""
    slots_bytes = k * layout.expert_matrix_bytes * layout.n_moe_layers
    return min(layout.n_moe_layers, round(slots_bytes / (layout.expert_tensor_bytes / layout.n_moe_layers)))


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every decode probe run by rebalance_probe.sh takes; the probe adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--k", type=int, default=51)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--slot-device", default="cuda", help="host: a dry run on a machine without a GPU")
    return parser


def omp_env() -> str:
    """The OpenMP settings a probe process runs under (the runtime reads them once), for its printout."""
    return " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND")
                    if k in os.environ) or "default env"


FLOOR = "llamahot floor (all hot, stops compute nothing)"
CALL_GRAPHS = ", hot graph built per call"
ONE_BY_ONE = ", slot copies one cudaMemcpyAsync each"   # A/B: without cudaMemcpyBatchAsync


def roofline_tok_s(hit_rate, t_gpu_s: float, t_cold_s: float):
    """T(h) = T_gpu + (1 - h) * T_cold as tok/s (issue #4): a hot-expert cache at hit rate h."""
    return 1 / (t_gpu_s + (1 - hit_rate) * t_cold_s)


def hybrid_name(k: int, resident: int, slots: int) -> str:
    return f"llamahot at K={k}'s VRAM: {resident} resident layers + {slots} slots"


def plan_resident(k: int, n_layers: int, n_expert: int, n_used: int, popularity: np.ndarray,
                  layer_ms: float, miss_ms: float) -> tuple[int, int, float]:
    """(resident layers, slots per other layer, predicted ms/token over stock GPU) for the VRAM of K
    slots in every layer: each managed layer costs layer_ms plus miss_ms per routed expert that
    misses, a resident layer costs nothing more. The hit rate of K' slots is estimated as the share
    of the routing the K' most popular experts of each layer took (`popularity`, counts)."""
    share = np.sort(popularity, axis=1)[:, ::-1].cumsum(axis=1) / np.maximum(popularity.sum(axis=1, keepdims=True), 1)
    hit = np.concatenate([[0.0], share.mean(axis=0)])  # hit[k'] for k' slots
    best = (0, k, float("inf"))
    for resident in range(n_layers):
        slots = min(n_expert, (k * n_layers - resident * n_expert) // (n_layers - resident))
        if slots < 0:
            break
        predicted = (n_layers - resident) * (layer_ms + (1 - hit[slots]) * n_used * miss_ms)
        if predicted < best[2]:
            best = (resident, int(slots), float(predicted))
    return best


def reset_counters_after_prompt(llm) -> None:
    if isinstance(llm, llamahot.Llama):
        llm.hot_cache.reset()  # llamahot's counters then cover the decode steps alone


def all_steps_hit_rate(llm, n_tokens: int, window) -> float:
    """Experts in place read the routing of some decode steps only (8 in a row in every 128 once the policy
    knows enough), so their hit rate samples those; the roofline wants every step's. The same decode again,
    untimed, every step read, through llama_cpp.Llama.eval: no rebalance, and reset() drops the routing
    before the policy sees it. (Outputs are exact, so the steps route as in the timed run.)"""
    cache = llm.hot_cache
    every, burst = cache.observe_every, cache.observe_burst
    cache.set_observe_every(1)
    decode_step_times(llm, n_tokens, after_prompt=reset_counters_after_prompt, text_tokens=window,
                      eval_step=eval_without_after_work(llm))
    hit_rate = cache.stats()["hit_rate"]
    cache.reset()
    cache.set_observe_every(every, burst=burst)
    return hit_rate


def prefill_rate(llm, tokens: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    finish(llm)
    return len(tokens) / (time.perf_counter() - start)


def prefill_tokens(llm, n: int) -> list[int]:
    text = (SHORT_PROMPT * 200)
    tokens = llm.tokenize(text)[:n]
    assert len(tokens) == n, f"need {n} prompt tokens, got {len(tokens)}"
    return tokens


def token_breakdown(events: list[tuple[int, int, int, str]]) -> dict[str, float]:
    """Where one decode step's time goes (ms), from the callbacks of a timeline (llamahot's
    timeline mode). The scheduler asks about each node of a split, runs the nodes asked so far when
    one is wanted or the split ends, synchronizes, then answers; so the gap after a node's ask is
    the compute of the piece it ends (plus the next split's input copies at a split boundary)."""
    out: dict[str, float] = {}

    def add(key: str, ns: int) -> None:
        out[key] = out.get(key, 0.0) + ns / 1e6

    for (t0, kind0, host0, _), (t1, kind1, host1, _) in zip(events, events[1:]):
        dt = t1 - t0
        if kind0 == 0:
            add("llamahot stop (answer)", dt)
        elif kind0 == 2:
            add("back from the stop to the next ask", dt)
        elif kind1 == 0:
            add("CPU piece before a stop" if host0 else "GPU piece before a stop", dt)
        elif host0 != host1:
            add("CPU piece + sync + copies to the GPU split" if host0 else "GPU split + sync + copies to the CPU split", dt)
        else:
            add("between asks of one split", dt)
    out["first to last callback"] = (events[-1][0] - events[0][0]) / 1e6 if events else 0.0
    out["stops"] = sum(1 for e in events if e[1] == 0)
    out["splits (host changes)"] = sum(1 for a, b in zip(events, events[1:]) if a[1] == 1 and b[1] == 1 and a[2] != b[2])
    return out


def breakdown_of(llm, skip_compute: bool, steps: int = 6, text_tokens: list[int] | None = None,
                 reduce=statistics.median) -> dict[str, float]:
    """Per-token breakdown over `steps` single-token decodes after a short prompt (greedy), or
    teacher-forced over text_tokens (its first 16 the prompt); reduce: over the tokens (median)."""
    llm.reset()
    llm.eval(llm.tokenize(SHORT_PROMPT) if text_tokens is None else text_tokens[:16])
    llm.hot_cache.set_debug(timeline=True, skip_compute=skip_compute)
    rows = []
    for step in range(steps):
        token = int(np.argmax(last_logits(llm))) if text_tokens is None else text_tokens[16 + step]
        llm.hot_cache.timeline()
        # llamahot.Llama.eval in its parts (same clock as the shim's: CLOCK_MONOTONIC), to place the
        # time before the first and after the last callback.
        t0 = time.monotonic_ns()
        llama_cpp.Llama.eval(llm, [token])
        t1 = time.monotonic_ns()
        llm.hot_cache.end_of_eval()
        llm.hot_cache.after_eval(1, (t1 - t0) / 1e9)
        t2 = time.monotonic_ns()
        finish(llm)   # as the decode benchmarks time a token
        t3 = time.monotonic_ns()
        events = llm.hot_cache.timeline()
        row = token_breakdown(events)
        if events:
            row["llama eval before the first callback"] = (events[0][0] - t0) / 1e6
            row["llama eval after the last callback (last split, logits, llama_cpp)"] = (t1 - events[-1][0]) / 1e6
        row["llamahot after eval (policy, rebalance, snapshot)"] = (t2 - t1) / 1e6
        row["synchronize after eval"] = (t3 - t2) / 1e6
        row["eval() wall"] = (t3 - t0) / 1e6
        rows.append(row)
    llm.hot_cache.set_debug()
    return {key: reduce([r.get(key, 0.0) for r in rows]) for key in rows[-1]}


def first_difference(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens are identical."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


TRAINED_PROMPT = b"        if self.width <= 0:\n"   # stock top-2 logit gap >= 0.39 for 128 greedy steps (CPU)


def check_trained_model(results: dict, kw: dict, gpu_mode: str | None) -> None:
    """Greedy tokens on the project's trained model (confident predictions, unlike random weights):
    stock all-on-GPU and llamahot on CUDA (gpu_mode) against stock experts-in-RAM."""
    path = str(Path(__file__).parents[2] / "models" / "llamahot-code-moe.gguf")
    layout = read_moe_layout(path)
    small = dict(kw, n_threads=4, n_threads_batch=4)
    steps = 128
    ram = StockPlaced(path, cpu_pattern=EXPERT_TENSOR_PATTERN, **small)
    ref, ref_logits = greedy_run(ram, steps, prompt=TRAINED_PROMPT)
    ram.close()
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    row = {"steps": steps, "stock_ram_min_top2_gap": float((top2[:, 1] - top2[:, 0]).min())}
    gpu = StockPlaced(path, cpu_pattern=None, **small)
    row["stock_gpu_identical"] = first_difference(greedy_run(gpu, steps, prompt=TRAINED_PROMPT)[0], ref)
    gpu.close()
    for k in (layout.n_expert_used, layout.n_expert // 2, layout.n_expert):
        for resident in (0, 2):
            hot = llamahot.Llama(path, hot_experts=k, resident_layers=resident, slot_device="cuda",
                                 gpu_mode=gpu_mode, **small)
            tokens, logits = greedy_run(hot, steps, prompt=TRAINED_PROMPT)
            row[f"llamahot_K{k}_resident{resident}_identical"] = first_difference(tokens, ref)
            row[f"llamahot_K{k}_resident{resident}_max_abs_logit_diff"] = float(np.abs(logits - ref_logits).max())
            hot.close()
    results["correctness"]["trained_model_greedy"] = row
    print(f"correctness on the trained model ({steps} greedy tokens vs stock RAM): " +
          ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in row.items()),
          flush=True)


def check_correctness(args, results: dict, ram, all_gpu, hot, check_ks: list[int]) -> None:
    """Greedy tokens and teacher-forced logits of llamahot (and stock GPU) against stock RAM."""
    ref_tokens, ref_logits = greedy_run(ram, args.check_steps)
    gpu_tokens, _ = greedy_run(all_gpu, args.check_steps)
    gpu_same = first_difference(gpu_tokens, ref_tokens)
    _, gpu_logits = greedy_run(all_gpu, args.check_steps, forced=ref_tokens)
    gpu_diff = float(np.abs(gpu_logits - ref_logits).max())
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    results["correctness"].update(stock_gpu_vs_ram_max_abs_logit_diff=gpu_diff, stock_gpu_identical_greedy_tokens=gpu_same,
                                  ram_logit_std=float(ref_logits.std()),
                                  ram_top2_gap_median=float(np.median(top2[:, 1] - top2[:, 0])))
    print(f"correctness: stock GPU vs stock RAM: greedy identical for {gpu_same}/{args.check_steps} tokens, "
          f"max |logit diff| over {args.check_steps} steps = {gpu_diff:.4g} (stock RAM logits: std "
          f"{ref_logits.std():.3g}, median top-2 gap {np.median(top2[:, 1] - top2[:, 0]):.3g})", flush=True)
    for k in check_ks:
        hot.hot_cache.set_hot_experts(k)
        greedy_run(hot, 16)  # first fill from a prompt
        tokens, _ = greedy_run(hot, args.check_steps)
        same = first_difference(tokens, ref_tokens)
        _, forced_logits = greedy_run(hot, args.check_steps, forced=ref_tokens)
        diff = float(np.abs(forced_logits - ref_logits).max())
        st = hot.hot_cache.stats()
        row = {"identical_greedy_tokens": same, "max_abs_logit_diff": diff, "hit_rate": st["hit_rate"],
               "open_mutations": hot.hot_cache.open_mutations(), "finite": bool(np.isfinite(forced_logits).all())}
        results["correctness"][f"llamahot_K{k}"] = row
        print(f"correctness: llamahot K={k}: greedy identical for {same}/{args.check_steps} tokens, "
              f"max |logit diff| {diff:.4g} (stock GPU: {gpu_diff:.4g}), hit rate {st['hit_rate']:.3f}", flush=True)
    results["correctness"]["stock_gpu_finite"] = bool(np.isfinite(gpu_logits).all())


def policy_variants(n_layers: int, n_expert: int, k: int, threads: int) -> list[tuple]:
    """(label, rebalance interval, policy, plan ahead, threads) of the rows --policy-variants adds."""
    def decayed(half_life, margin):
        return DecayedFrequency(n_layers, n_expert, k, half_life=half_life, margin=margin)
    fewer = f"{threads - 1} threads"
    # Session 8 measured six settings in two calls (benchmarks/RESULTS.md); none beat the default in
    # both. These two were the best of them; fewer rows leave room for more repetitions.
    return [
        (f"every token, half-life 32, margin 0.25, planned ahead, {fewer}", 1, decayed(32, 0.25), True, threads - 1),
        (f"LRU, every token, planned ahead, {fewer}", 1, LRU(n_layers, n_expert, k), True, threads - 1),
    ]


def managed_variants(n_layers: int, n_expert: int, k: int, threads: int) -> list[tuple]:
    """Rows of --policy-variants with the experts in place: (label, then configure()'s arguments: policy,
    interval, plan ahead, threads, lone-row ms, page moves (read_mostly, background), routing read every n
    steps). Session 18 tried read-mostly copies and faster policies here (benchmarks/RESULTS.md); with a
    routing profile the policy hardly moves: reading the routing one step in 4 or 16 (session 19) against
    every step and one in 64."""
    def decayed(half_life, margin):
        return DecayedFrequency(n_layers, n_expert, k, half_life=half_life, margin=margin)
    return [
        (f"routing read one step in {n}" if n > 1 else "routing read every step", decayed(2048, 3.0), 64, False,
         threads, 0.0, (False, True), n)
        for n in (1, 64)
    ]


def configure(llm, policy, interval: int, plan_ahead: bool, threads: int, lone_row_idle_ms: float = 0.0,
              page_moves: tuple[bool, bool] | None = None, observe_every: int | None = None) -> bool:
    """Put a llamahot.Llama on a policy setting and a thread count (llama's and the shim's), and with the
    experts in place on a way to move pages ((read_mostly, background); None: the default). Returns
    whether the page moves changed (the hot set was emptied)."""
    changed = False
    pages = llm.hot_cache._pages
    if pages is not None:
        read_mostly, background = page_moves or (False, True)
        if (pages.read_mostly, pages.background) != (read_mostly, background):
            llm.hot_cache.set_page_moves(read_mostly=read_mostly, background=background)
            changed = True
        llm.hot_cache.set_observe_every(observe_every)   # None: the default (every step while learning)
    llm.hot_cache.use_policy(policy, rebalance_interval=interval, plan_ahead=plan_ahead)
    llama_cpp.llama_set_n_threads(llm.ctx, threads, llm.context_params.n_threads_batch)
    llm.hot_cache.set_threads(threads)
    llm.hot_cache.set_lone_row_idle_ms(lone_row_idle_ms)
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="the GGUF to benchmark (not needed with --replot)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ks", default="16,32,64,96,128")
    parser.add_argument("--check-ks", default="32,64", help="K values checked against stock for correctness")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per repetition")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--check-steps", type=int, default=256)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--skip-trained-check", action="store_true",
                        help="leave out the greedy-token check on the trained model")
    parser.add_argument("--text", default=None,
                        help="teacher-forced decode over this text (real routing) instead of greedy decode")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting new K blocks after this many seconds (results so far are kept)")
    parser.add_argument("--gpu-mode", choices=("default", "managed", "redirect"), default="default",
                        help="llamahot's gpu_mode on CUDA (default: the library's, gpu_mode=None; managed: experts "
                             "in place; redirect: slots and stops)")
    parser.add_argument("--redirect-row", action="store_true",
                        help="with the experts in place, also a row of a gpu_mode='redirect' instance at each K")
    parser.add_argument("--profile-windows", type=int, default=0,
                        help="with --text: record a routing profile from this many windows of the text's second "
                             "half (never measured) and start every llamahot instance from it")
    parser.add_argument("--no-profile-row", action="store_true",
                        help="with --profile-windows, also a row of an instance without the profile at each K")
    parser.add_argument("--mechanism-ab", action=argparse.BooleanOptionalAction, default=True,
                        help="A/B rows at the first K on CUDA: hot graph built per call, slot copies one by one")
    parser.add_argument("--lone-row-ms", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                        help="rows at every K with set_lone_row_idle_ms(MS), e.g. 0.5,2")
    parser.add_argument("--policy-variants", action="store_true",
                        help="also measure other policy settings at the first K (rebalance every token)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw OUT/decode_vs_vram.png from OUT/results.json (no model needed)")
    args = parser.parse_args()
    if args.replot:
        plot(Path(args.out) / "decode_vs_vram.png", json.loads((Path(args.out) / "results.json").read_text()))
        return 0
    if args.model is None:
        parser.error("the model GGUF is needed (or --replot)")
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    device = "cuda" if gpu else "host"
    asked_mode = None if args.gpu_mode == "default" else args.gpu_mode   # None: the library chooses
    layout = read_moe_layout(args.model)
    ks = list(dict.fromkeys(min(int(k), layout.n_expert) for k in args.ks.split(",")))  # in the order given
    check_ks = sorted({min(int(k), layout.n_expert) for k in args.check_ks.split(",") if k})
    kw = dict(n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=args.threads, n_threads_batch=args.threads,
              n_gpu_layers=-1, verbose=False)
    expert_vram_per_slot = layout.expert_matrix_bytes * layout.n_moe_layers   # one slot in every layer
    layer_expert_bytes = layout.expert_tensor_bytes / layout.n_moe_layers
    print(f"model {Path(args.model).name}: {layout.arch}, {layout.n_moe_layers} MoE layers x {layout.n_expert} "
          f"experts ({layout.n_expert_used} used), experts {layout.expert_tensor_bytes / 2**30:.2f} GiB; "
          f"slot device {device}; {platform.node()}", flush=True)

    t0 = time.perf_counter()
    ram = StockPlaced(args.model, cpu_pattern=EXPERT_TENSOR_PATTERN, **kw)
    ram_mmap = StockPlaced(args.model, cpu_pattern=EXPERT_TENSOR_PATTERN, use_mmap=True, **kw)
    all_gpu = StockPlaced(args.model, cpu_pattern=None, **kw)
    # Teacher forcing: each measured run reads the next window of the text (16 prompt tokens + --tokens).
    windows: list[list[int]] = []
    long_prompt = None
    profile_path: Path | None = None   # --profile-windows: every llamahot instance starts from it
    results_profile: dict | None = None
    if args.text:
        text_ids = ram.tokenize(Path(args.text).read_bytes(), add_bos=False)
        size = 16 + args.tokens
        windows = [text_ids[i:i + size] for i in range(0, len(text_ids) - size + 1, size)]
        print(f"teacher-forced decode over {Path(args.text).name}: {len(windows)} windows of {size} tokens")
        # Prefill on the same kind of text (a repeated short prompt routes to a handful of experts, and
        # in place its routing would then steer the hot set away from the text measured).
        middle = len(text_ids) // 2
        long_prompt = text_ids[middle: middle + args.prefill]
        if args.profile_windows:
            # Windows of the second half, before the last three (used to settle settings and to plan):
            # decode samples read windows from the start, so the profile never saw the text measured.
            recorded = windows[len(windows) // 2:-3][: args.profile_windows]
            profile_path = out / "profile.npz"
            profile_path.unlink(missing_ok=True)
            t1 = time.perf_counter()
            n = record_profile(args.model, recorded, profile_path, window=size, slot_device=device,
                               n_threads=args.threads, n_threads_batch=args.threads, n_gpu_layers=-1)
            print(f"routing profile: {n} tokens ({len(recorded)} windows) in {time.perf_counter() - t1:.1f} s", flush=True)
            results_profile = {"windows": len(recorded), "tokens": n, "record_s": time.perf_counter() - t1}
    copies = Path(tempfile.mkdtemp(prefix="llamahot-bench-"))

    def profile_kw_for(name: str) -> dict:   # each instance its own copy: closing one adds to it
        if profile_path is None:
            return {}
        copy = copies / f"{name}.npz"
        copy.write_bytes(profile_path.read_bytes())
        return {"routing_profile": copy}

    hot = llamahot.Llama(args.model, hot_experts=max(ks), slot_device=device, gpu_mode=asked_mode, **kw,
                         **profile_kw_for("hot"))
    mode = hot.hot_cache.gpu_mode   # as the library resolved it
    redirect = mode != "managed"   # the stops' rows (floor, mechanism A/B, resident mix, breakdowns)
    print(f"llamahot: gpu_mode {mode}{' (the default)' if asked_mode is None else ''}", flush=True)
    print(f"loaded stock RAM, stock GPU, llamahot in {time.perf_counter() - t0:.1f} s", flush=True)
    if long_prompt is None or len(long_prompt) < args.prefill:
        long_prompt = prefill_tokens(ram, args.prefill)
    runs_of: dict[str, int] = {}
    results: dict = {"model": Path(args.model).name, "device": device, "gpu_mode": mode, "threads": args.threads,
                     "decode": f"teacher-forced over {Path(args.text).name}" if args.text else "greedy",
                     "layout": {"n_moe_layers": layout.n_moe_layers, "n_expert": layout.n_expert,
                                "n_expert_used": layout.n_expert_used,
                                "expert_gib": layout.expert_tensor_bytes / 2**30},
                     "correctness": {}, "speed": {}, "profile": results_profile,
                     "prefill_text": "the text" if args.text else "a repeated short prompt"}

    # -- correctness: greedy tokens and logits against stock experts-in-RAM -----------------------
    def save() -> None:  # after every section, so a run cut short still leaves its results
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")

    try:
        if gpu and not args.skip_trained_check:
            check_trained_model(results, kw, mode)
        check_correctness(args, results, ram, all_gpu, hot, check_ks)
    except Exception as exc:  # keep going: the speed table is still worth having
        import traceback
        traceback.print_exc()
        results.setdefault("errors", []).append(f"correctness: {exc!r}")
    save()

    # -- speed -------------------------------------------------------------------------------------
    longest_rebalance: dict[str, float] = {}

    def measure(llm, name: str) -> dict:
        # Rebalance stalls are read right after the decode steps (the counters were zeroed after the
        # prompt): the refill a new long prompt triggers is prompt work, not a decode stall.
        run = runs_of[name] = runs_of.get(name, -1) + 1
        window = windows[run % len(windows)] if windows else None
        d = decode_rate(llm, args.tokens, after_prompt=reset_counters_after_prompt, text_tokens=window)
        row = {"decode_tok_s": d}
        if isinstance(llm, llamahot.Llama):
            st = llm.hot_cache.stats()
            n = max(st["decode_tokens"], 1)
            longest_rebalance[name] = max(longest_rebalance.get(name, 0.0), st["max_rebalance_ms"])
            row.update(hit_rate=st["hit_rate"],
                       stops_ms_per_token=st["redirect_ms"] / n, gpu_submit_ms_per_token=st["gpu_submit_ms"] / n,
                       gpu_wait_ms_per_token=st["gpu_wait_ms"] / n, cpu_ms_per_token=st["cpu_compute_ms"] / n,
                       slot_gib=st["slot_bytes"] / 2**30, experts_loaded_per_token=st["experts_loaded"] / n,
                       rebalance_ms_per_token=st["rebalance_ms"] / n, cpu_runs_per_token=st["cpu_runs"] / n,
                       cpu_rows_per_token=st["cpu_rows"] / n, lone_row_runs_per_token=st["lone_row_runs"] / n)
            if llm.hot_cache.in_place and st["observe_every"] > 1:
                row.update(hit_rate_of_steps_read=st["hit_rate"],
                           hit_rate=all_steps_hit_rate(llm, args.tokens, window))
        return row

    samples: dict[str, list[dict]] = {}

    def run_block(rows: list[tuple[str, object]], setup=lambda name, llm: None) -> None:
        """Every row in every repetition (rotated order), setup(name, llm) before each: decode first,
        then prefill. A prefill (512 tokens of a repeated short prompt) re-targets llamahot's hot set
        to its own text, so it no longer runs between decode windows (until session 9 each sample's
        prefills came right after its decode; separating them did not change llamahot's decode ratio
        on the H100, benchmarks/RESULTS.md, but the decode rows now measure decoding alone)."""
        first = {name: len(samples.get(name, [])) for name, _ in rows}
        for stage in ("decode", "prefill"):
            for rep in range(args.reps):
                for name, llm in rows[rep % len(rows):] + rows[: rep % len(rows)]:
                    setup(name, llm)
                    if stage == "decode":
                        samples.setdefault(name, []).append(measure(llm, name))
                    else:  # three prefills per sample: one is ~0.2 s and varied by a few % between samples
                        samples[name][first[name] + rep]["prefill_tok_s"] = statistics.median(
                            prefill_rate(llm, long_prompt) for _ in range(3))

    # Callback installed but idle, and observing only (K = 0), against stock RAM measured in the same
    # block (stock RAM is measured again with every K later; drift between blocks is not their cost).
    hot.hot_cache.set_hot_experts(0)
    idle_modes = ["stock RAM", "stock RAM (mmap)", "llamahot idle", "llamahot observing"]
    run_block(list(zip(idle_modes, (ram, ram_mmap, hot, hot))),
              lambda name, llm: hot.hot_cache.set_observing(name != "llamahot idle"))
    idle_block_ram = list(samples["stock RAM"])
    hot.hot_cache.set_observing(True)
    ram_mmap.close()

    # -- planning resident layers from this machine's own costs, measured here ------------------
    n_layers, n_used, n_expert = layout.n_moe_layers, layout.n_expert_used, layout.n_expert
    hot.hot_cache.set_hot_experts(n_expert)
    greedy_run(hot, 16)  # first fill
    run_block([("stock GPU", all_gpu), (f"llamahot K={n_expert}", hot)] + ([(FLOOR, hot)] if redirect else []),
              lambda name, llm: hot.hot_cache.set_debug(skip_compute=name == FLOOR))
    hot.hot_cache.set_debug()
    plans = {k: (0, k, 0.0) for k in ks}   # experts in place: no layer trips to plan around
    if redirect:
        hot.hot_cache.reset()
        for run in range(2):  # routing popularity of the decode the benchmark measures
            decode_rate(hot, args.tokens, text_tokens=windows[-1 - run] if windows else None)
        popularity = hot.hot_cache.routing_counts()
        t_of = {name: 1 / statistics.median(r["decode_tok_s"] for r in samples[name])
                for name in ("stock GPU", "stock RAM", f"llamahot K={n_expert}", FLOOR)}
        costs = {"layer_ms": (t_of[f"llamahot K={n_expert}"] - t_of["stock GPU"]) / n_layers * 1e3,
                 "miss_ms": (t_of["stock RAM"] - t_of[FLOOR]) / (n_layers * n_used) * 1e3}
        plans = {k: plan_resident(k, n_layers, n_expert, n_used, popularity, **costs) for k in ks}
        results["speed"]["resident_plan"] = {"costs": costs, "plans": {str(k): p for k, p in plans.items()}}
        print(f"plan: a managed layer costs {costs['layer_ms']:.3f} ms/token, a miss {costs['miss_ms']:.3f} ms; "
              + ", ".join(f"K={k}: {g} resident + {k2} slots" for k, (g, k2, _) in plans.items()), flush=True)

    measured_ks = []
    breakdowns: dict[str, dict[str, float]] = {}
    for k in ks:
        if measured_ks and time.perf_counter() - started > args.budget_s:
            print(f"K={k}: skipped (time budget of {args.budget_s:.0f} s spent)", flush=True)
            results.setdefault("skipped_ks", []).append(k)
            continue
        gpu_layers = static_layers_for(k, layout)
        static = StockPlaced(args.model, cpu_pattern=static_cpu_pattern(layout.n_moe_layers - gpu_layers, layout), **kw)
        hot.hot_cache.set_hot_experts(k)
        greedy_run(hot, 16)  # first fill
        modes = [("stock RAM", ram), (f"stock static {gpu_layers} layers", static), (f"llamahot K={k}", hot),
                 ("stock GPU", all_gpu)]
        resident, k2, _ = plans[k]
        hybrid = None
        if resident > 0:
            hybrid = llamahot.Llama(args.model, hot_experts=k2, resident_layers=resident, slot_device=device,
                                    gpu_mode=mode, **kw)
            greedy_run(hybrid, 16)  # first fill
            modes.append((hybrid_name(k, resident, k2), hybrid))
        redirected = None
        if args.redirect_row and not redirect:   # the same K with the other design, interleaved
            redirected = llamahot.Llama(args.model, hot_experts=k, slot_device=device, gpu_mode="redirect", **kw,
                                        **profile_kw_for("redirect"))
            greedy_run(redirected, 16)  # first fill
            modes.append((f"llamahot K={k}, redirect", redirected))
        unprofiled = None
        if profile_path is not None and args.no_profile_row:   # the same K starting cold, as without a profile
            unprofiled = llamahot.Llama(args.model, hot_experts=k, slot_device=device, gpu_mode=mode, **kw)
            greedy_run(unprofiled, 16)  # first fill
            modes.append((f"llamahot K={k}, no profile", unprofiled))
        if k == layout.n_expert and redirect:  # the stops alone, nothing computed: the floor of this design
            modes.append((FLOOR, hot))
        # What the per-layer persistent hot graphs save. (A/B rows of cold_on_device, measured in session 7 —
        # 0.25 tied with 0, 0.5 and 0.75 were slower, benchmarks/RESULTS.md — are no longer run.)
        if k == ks[0] and device == "cuda" and args.mechanism_ab and redirect:
            modes.append((f"llamahot K={k}{CALL_GRAPHS}", hot))
            if getattr(hot.hot_cache.slots.copies, "batch", False):
                modes.append((f"llamahot K={k}{ONE_BY_ONE}", hot))
        # Other policy settings at the first K, interleaved with the rest (the machine drifts between
        # blocks): on a GPU a copy is an asynchronous DMA, not a CPU read, so the trace study's cost
        # model (which chose the default) may charge loads too much there.
        # Row name -> its setting: configure()'s arguments for llamahot rows, a thread count for static ones.
        settings: dict[str, object] = {}
        default_setting = (hot.hot_cache.policy, hot.hot_cache.rebalance_interval, False, args.threads)

        def add_row(name: str, llm, setting) -> None:
            modes.append((name, llm))
            settings[name] = setting

        for ms in args.lone_row_ms:   # rare single cold rows on one thread (sleeping pool threads)
            add_row(f"llamahot K={k}, lone row on one thread after {ms:g} ms idle", hot, (*default_setting, ms))
        if args.policy_variants and k == ks[0] and not redirect:
            for label, *setting in managed_variants(n_layers, n_expert, k, args.threads):
                add_row(f"llamahot K={k}, {label}", hot, tuple(setting))
        elif args.policy_variants and k == ks[0]:
            for label, interval, policy, ahead, threads in policy_variants(n_layers, n_expert, k, args.threads):
                add_row(f"llamahot K={k}, {label}", hot, (policy, interval, ahead, threads))
            # Stock with fewer threads too: llamahot's planner thread takes a core.
            add_row(f"stock static {gpu_layers} layers, {args.threads - 1} threads", static, args.threads - 1)
        copies = hot.hot_cache.slots.copies
        batch = getattr(copies, "batch", False)
        results["speed"].setdefault("batched_copies", {})[str(k)] = batch

        current = [default_setting]

        def setup(name: str, llm) -> None:
            hot.hot_cache.set_debug(skip_compute=name == FLOOR, call_graphs=name.endswith(CALL_GRAPHS))
            if batch:
                copies.batch = not name.endswith(ONE_BY_ONE)
            if llm is hot:
                setting = settings.get(name, default_setting)
                if configure(hot, *setting) or setting is not current[0]:
                    # A new setting (a policy, a way to move pages) first settles its hot set on a window
                    # that is not measured, so the sample measures its steady state.
                    decode_rate(hot, args.tokens, text_tokens=windows[-3] if windows else None)
                    if hot.hot_cache._pages is not None:
                        hot.hot_cache._pages.wait()
                current[0] = setting
            elif llm is static:
                llama_cpp.llama_set_n_threads(static.ctx, settings.get(name, args.threads), args.threads)

        run_block(modes, setup)
        hot.hot_cache.set_debug()
        configure(hot, *default_setting)
        if batch:
            copies.batch = True
        print(f"K={k}: slot copies {'batched (cudaMemcpyBatchAsync)' if copies is not None and copies.batch else 'one by one'}",
              flush=True)
        results["speed"].setdefault("static_for_k", {})[str(k)] = f"stock static {gpu_layers} layers"
        if redirect:
            breakdowns[f"llamahot K={k}"] = breakdown_of(hot, skip_compute=False)
        static.close()
        for extra in (hybrid, redirected, unprofiled):
            if extra is not None:
                extra.close()
        measured_ks.append(k)
        save()
        print(f"K={k}: measured after {time.perf_counter() - started:.0f} s", flush=True)
    ks = measured_ks

    # -- where a token's time goes (callback timelines), at the largest K measured --------------
    if ks and redirect:
        for name, skip in ((FLOOR, True), ("llamahot idle (K unchanged)", None)):
            hot.hot_cache.set_observing(skip is not None)
            breakdowns[name] = breakdown_of(hot, skip_compute=bool(skip))
        hot.hot_cache.set_observing(True)
        results["speed"]["token_breakdown_ms"] = breakdowns
        keys = list(dict.fromkeys(k for b in breakdowns.values() for k in b))
        lines_b = ["| per decode step (median of 6) | " + " | ".join(breakdowns) + " |",
                   "|---|" + "---|" * len(breakdowns)]
        for key in keys:
            lines_b.append(f"| {key} | " + " | ".join(f"{b.get(key, 0.0):.3f}" for b in breakdowns.values()) + " |")
        (out / "breakdown.md").write_text("\n".join(lines_b) + "\n")
        print("\n".join(lines_b), flush=True)

    summary = {}
    for name, rows in samples.items():
        keys = rows[0].keys()
        summary[name] = {key: statistics.median(r[key] for r in rows if key in r) for key in keys}
        summary[name]["n"] = len(rows)
    t_gpu = 1 / summary["stock GPU"]["decode_tok_s"]
    t_ram = 1 / summary["stock RAM"]["decode_tok_s"]
    t_cold = t_ram - t_gpu
    results["speed"]["summary"] = summary
    results["speed"]["samples"] = samples  # every repetition, to see the spread behind each median
    results["speed"]["longest_rebalance_ms"] = longest_rebalance
    results["speed"]["roofline"] = {"t_gpu_ms": t_gpu * 1e3, "t_cold_ms": t_cold * 1e3}

    lines = ["| mode | VRAM for experts (GiB) | decode tok/s | vs stock RAM | prefill tok/s | vs stock RAM | "
             "hit rate | roofline tok/s | vs roofline |", "|---|---|---|---|---|---|---|---|---|"]
    base_d, base_p = summary["stock RAM"]["decode_tok_s"], summary["stock RAM"]["prefill_tok_s"]

    idle_d = statistics.median(r["decode_tok_s"] for r in idle_block_ram) if idle_block_ram else base_d
    idle_p = statistics.median(r["prefill_tok_s"] for r in idle_block_ram) if idle_block_ram else base_p
    results["speed"]["stock_ram_in_idle_block"] = {"decode_tok_s": idle_d, "prefill_tok_s": idle_p}

    # Rows measured at a K besides llamahot's default: A/B modes and policy settings ("llamahot K=51, ...").
    variants_of = {k: [n for n in summary if n.startswith(f"llamahot K={k}, ")] for k in ks}

    def line(name, vram, roof=None):
        s = summary[name]
        d, p = (idle_d, idle_p) if name in idle_modes[1:] else (base_d, base_p)  # same-block base
        hit = f"{s['hit_rate']:.3f}" if "hit_rate" in s else ""
        roof_cols = f"{roof:.1f} | {s['decode_tok_s'] / roof:.3f}" if roof else " | "
        lines.append(f"| {name} | {vram} | {s['decode_tok_s']:.1f} | {s['decode_tok_s'] / d:.3f} | "
                     f"{s['prefill_tok_s']:.0f} | {s['prefill_tok_s'] / p:.3f} | {hit} | {roof_cols} |")

    line("stock RAM", "0")
    line("stock RAM (mmap)", "0")
    line("llamahot idle", "0")
    line("llamahot observing", "0")
    for k in ks:
        static_name = results["speed"]["static_for_k"][str(k)]
        g = int(re.search(r"(\d+) layers", static_name).group(1))
        line(static_name, f"{g * layer_expert_bytes / 2**30:.2f}")
        for name in (n for n in summary if n.startswith(static_name + ", ")):   # the same, fewer threads
            line(name, f"{g * layer_expert_bytes / 2**30:.2f}")
        s = summary[f"llamahot K={k}"]
        roof = roofline_tok_s(s["hit_rate"], t_gpu, t_cold)
        s["roofline_tok_s"] = roof
        line(f"llamahot K={k}", f"{k * expert_vram_per_slot / 2**30:.2f}", roof)
        resident, k2, _ = plans[k]
        if resident > 0 and hybrid_name(k, resident, k2) in summary:
            vram = (resident * layer_expert_bytes + k2 * (n_layers - resident) * layout.expert_matrix_bytes) / 2**30
            line(hybrid_name(k, resident, k2), f"{vram:.2f}")
        for name in variants_of[k]:
            line(name, f"{k * expert_vram_per_slot / 2**30:.2f}", roofline_tok_s(summary[name]["hit_rate"], t_gpu, t_cold))
    if FLOOR in summary:
        line(FLOOR, f"{layout.n_expert * expert_vram_per_slot / 2**30:.2f}")
    line("stock GPU", f"{layout.expert_tensor_bytes / 2**30:.2f}")
    detail = ["| llamahot K | vs static at equal VRAM | resident mix vs static | stops ms/token | GPU submit ms/token | "
              "GPU wait ms/token | CPU ms/token | CPU runs/token | CPU rows/token | rebalance ms/token | "
              "experts loaded/token | longest rebalance ms (decode) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def detail_row(label: str, name: str, vs_static: float, mix_vs: str = "") -> str:
        v = summary[name]
        return (f"| {label} | {vs_static:.3f} | {mix_vs} | {v['stops_ms_per_token']:.2f} | {v['gpu_submit_ms_per_token']:.2f} | "
                f"{v['gpu_wait_ms_per_token']:.2f} | {v['cpu_ms_per_token']:.2f} | {v.get('cpu_runs_per_token', 0.0):.1f} | "
                f"{v.get('cpu_rows_per_token', 0.0):.1f} | {v.get('rebalance_ms_per_token', 0.0):.2f} | "
                f"{v['experts_loaded_per_token']:.1f} | {longest_rebalance.get(name, 0.0):.1f} |")

    for k in ks:
        s = summary[f"llamahot K={k}"]
        static_tok_s = summary[results["speed"]["static_for_k"][str(k)]]["decode_tok_s"]
        s["vs_static"] = s["decode_tok_s"] / static_tok_s
        mix = summary.get(hybrid_name(k, *plans[k][:2]))
        mix_vs = f"{mix['decode_tok_s'] / static_tok_s:.3f}" if mix else ""
        detail.append(detail_row(str(k), f"llamahot K={k}", s["vs_static"], mix_vs))
        for name in variants_of[k]:
            detail.append(detail_row(name[len("llamahot K="):], name, summary[name]["decode_tok_s"] / static_tok_s))
    same_block = (f"The mmap, idle and observing rows compare with stock RAM's samples of their own block "
                  f"({idle_d:.1f} tok/s decode, {idle_p:.0f} tok/s prefill), the others with all of them.")
    table = "\n".join(lines + ["", same_block, ""] + detail)
    print(table)
    print(f"roofline: T_gpu {t_gpu * 1e3:.2f} ms (stock GPU), T_cold {t_cold * 1e3:.2f} ms (stock RAM - stock GPU)")
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    plot(out / "decode_vs_vram.png", results)
    hot.close()
    ram.close()
    all_gpu.close()
    return 0


def plot(path: Path, results: dict) -> None:
    """Decode tok/s against VRAM for experts: stock static offload, llamahot's slots and resident
    mixes, and the roofline of a hot-expert cache at the hit rates llamahot reached (uniform
    routing's h = K/n_expert as a curve beside them). Everything from results.json."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    speed, lay = results["speed"], results["layout"]
    summary, n_expert = speed["summary"], lay["n_expert"]
    per_slot = lay["expert_gib"] / n_expert                  # GiB of VRAM per slot (all layers)
    per_layer = lay["expert_gib"] / lay["n_moe_layers"]      # GiB of one layer's experts
    t_gpu, t_cold = speed["roofline"]["t_gpu_ms"] / 1e3, speed["roofline"]["t_cold_ms"] / 1e3
    ks = sorted(int(k) for k in speed["static_for_k"])
    static = sorted((int(re.search(r"(\d+) layers", speed["static_for_k"][str(k)]).group(1)) * per_layer,
                     summary[speed["static_for_k"][str(k)]]["decode_tok_s"]) for k in ks)
    hot = [(k * per_slot, summary[f"llamahot K={k}"]["decode_tok_s"]) for k in ks]
    mixes = sorted((int(re.search(r"K=(\d+)'s VRAM", name).group(1)) * per_slot, row["decode_tok_s"])
                   for name, row in summary.items() if "'s VRAM:" in name)
    roof_at_h = [(k * per_slot, roofline_tok_s(summary[f"llamahot K={k}"]["hit_rate"], t_gpu, t_cold)) for k in ks]
    grid = np.linspace(0, n_expert, 65)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid * per_slot, roofline_tok_s(grid / n_expert, t_gpu, t_cold), "--", color="gray", lw=0.8,
            label="roofline, uniform routing (h = K/n_expert)")
    ax.plot(*zip(*roof_at_h), "x:", color="gray", label="roofline at llamahot's measured hit rate")
    ax.plot(*zip(*static), "s-", label="stock static offload (whole layers)")
    ax.plot(*zip(*hot), "o-", label="llamahot, slots in every layer")
    if mixes:
        ax.plot(*zip(*mixes), "D-", label="llamahot, resident layers + slots")
    ax.axhline(summary["stock RAM"]["decode_tok_s"], color="C3", lw=0.8, label="stock, experts in RAM")
    ax.axhline(summary["stock GPU"]["decode_tok_s"], color="C2", lw=0.8, label="stock, all on GPU")
    ax.set_xlabel("VRAM for routed experts (GiB)")
    ax.set_ylabel("decode tok/s (synchronized)")
    ax.set_title(f"{results['model']}: decode speed vs VRAM ({results['decode']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
