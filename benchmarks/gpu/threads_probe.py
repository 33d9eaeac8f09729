"""Stock baselines and llamahot side by side in one process, many repetitions, few rows, decode only:
to compare settings that must be fixed per process (OMP_WAIT_POLICY, GOMP_SPINCOUNT: the OpenMP
runtime reads them once), and llamahot's decode with no prefill between its windows.

Rows, interleaved in every repetition over the same teacher-forced window of held-out code: stock
experts in RAM, stock static offload of as many layers as K slots' VRAM, and one llamahot instance at
K (default policy) per variant (its own instance: slots warmed by one row's window must not serve
another): `default`; `nopool` (the stops' CPU graphs through ggml's OpenMP team); `ggml` (ggml's MUL_MAT_ID in the stops' CPU graphs instead of the shim's
row-sliced node); `pool:MS` (the stops'
CPU graphs on the shim's own threads, spinning MS ms); `shim-threads:N` (the stops' graphs on N threads, llama keeping its own); `llama-threads:N` (llama's
single-token decode on N threads: its CPU split's OpenMP team, the shim keeping its own);
`rowpf:BYTES` (the sliced matmuls' threads prefetch BYTES ahead of their rows; 0: off);
`cold-after-submit` (a stop's cold rows start on the pool only after its hot part is submitted);
`call-cold-graphs` (a stop's cold CPU graph built per call, not the layer's persistent one replayed);
`serial-glu` (the GLU between a pool graph's sliced matmuls on one thread between two barriers, not on
each thread's own slices); `cold-dev:SHARE` (that share of each stop's cold experts DMA'd to the GPU and
computed there while the CPU computes the rest: set_cold_on_device).
Policies: `lru:I` (LRU, a rebalance every I tokens), `decayed:H:M:I` (the decayed policy with half-life
H tokens and margin M, every I tokens), with modifiers after `+`: `ahead` (planned in the worker), `chunkN` (slot
copies split into N KiB pieces: do big copies delay the scheduler's small ones?), `threadsN` (llama's
and the shim's threads), `llamaN` (llama's single-token threads alone), e.g. `lru:1+chunk256`. Prints per-row medians and the medians of the
per-repetition ratios (the machine drifts between repetitions); with --breakdown N, each llamahot
row's per-token timeline over N teacher-forced tokens (where a token's time goes).

    python benchmarks/gpu/threads_probe.py MODEL.gguf [--k 51] [--reps 6] [--tokens 64] [--variants default,ggml]
Run through rebalance_probe.sh with a variants file (one process per line, its environment first).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import llamahot  # before numpy: numpy first made the device's CUDA build of llama_cpp die silently at load
import llama_cpp
from llamahot.benchmark import StockPlaced, decode_rate
from llamahot.model_info import EXPERT_TENSOR_PATTERN, read_moe_layout
from llamahot.policy import LRU, DecayedFrequency

from bench import breakdown_of, configure, omp_env, probe_parser, static_cpu_pattern, static_layers_for

# Counters shown per token for each llamahot row (what loads cost, where a stop's time goes).
PER_TOKEN = ("experts_loaded", "rebalance_ms", "fence_waits", "fence_wait_ms", "redirect_ms", "stop_setup_ms", "cpu_compute_ms",
             "cpu_rows", "cpu_runs", "early_pool_graphs", "co_sliced_nodes", "device_cold_rows", "persistent_cpu_runs", "gpu_submit_ms", "gpu_wait_ms",
             "dev_copy_wait_ms")
VARIANTS = "default, nopool, ggml, cold-after-submit, call-cold-graphs, serial-glu, cold-dev:SHARE, pool:MS, shim-threads:N, llama-threads:N, rowpf:BYTES, lru:INTERVAL, decayed:HALF_LIFE:MARGIN:INTERVAL (+ahead, +chunkN, +threadsN, +llamaN)"


def chunked(copies, piece: int) -> None:
    """Split each slot copy into pieces of at most `piece` bytes (the probe's A/B of copy sizes)."""
    issue = copies.issue

    def issue_in_pieces(group, dsts, srcs, sizes, n_loads):
        d, s, n = [], [], []
        for dst, src, size in zip(dsts, srcs, sizes):
            for at in range(0, size, piece):
                d.append(dst + at)
                s.append(src + at)
                n.append(min(piece, size - at))
        return issue(group, d, s, n, n_loads)

    copies.issue = issue_in_pieces


def set_llama_threads(llm, n: int) -> None:
    """llama's single-token decode threads alone (its CPU split's OpenMP team); the shim keeps its own."""
    llama_cpp.llama_set_n_threads(llm.ctx, n, llm.context_params.n_threads_batch)


def setup_variant(llm, variant: str, layout, k: int, threads: int) -> None:
    base, *mods = variant.split("+")
    policy, interval = None, llm.hot_cache.rebalance_interval
    if base == "ggml":
        llm.hot_cache.set_debug(ggml_matmuls=True)
    elif base == "cold-after-submit":
        llm.hot_cache.set_debug(cold_after_submit=True)
    elif base == "call-cold-graphs":
        llm.hot_cache.set_debug(call_cold_graphs=True)
    elif base == "serial-glu":
        llm.hot_cache.set_debug(serial_elementwise=True)
    elif base.startswith("cold-dev:"):
        llm.hot_cache.set_cold_on_device(float(base[9:]))
    elif base.startswith("shim-threads:"):
        llm.hot_cache.set_threads(int(base[13:]))
    elif base.startswith("llama-threads:"):
        set_llama_threads(llm, int(base[14:]))
    elif base == "nopool":
        llm.hot_cache.set_thread_pool(None)
    elif base.startswith("pool:"):
        llm.hot_cache.set_thread_pool(float(base[5:]))
    elif base.startswith("rowpf:"):
        llm.hot_cache.set_row_prefetch(int(base[6:]))
    elif base.startswith("lru:"):
        policy, interval = LRU(layout.n_moe_layers, layout.n_expert, k), int(base[4:])
    elif base.startswith("decayed:"):
        half_life, margin, every = base[8:].split(":")
        policy = DecayedFrequency(layout.n_moe_layers, layout.n_expert, k, half_life=float(half_life), margin=float(margin))
        interval = int(every)
    elif base != "default":
        raise SystemExit(f"unknown variant {variant!r}: {VARIANTS}")
    ahead = "ahead" in mods
    n_threads = next((int(m[7:]) for m in mods if m.startswith("threads")), threads)
    if policy is not None or ahead or n_threads != threads:
        configure(llm, policy or llm.hot_cache.policy, interval, ahead, n_threads)
    for mod in mods:
        if mod.startswith("chunk"):
            chunked(llm.hot_cache.slots.copies, int(mod[5:]) * 1024)
        elif mod.startswith("llama"):   # as the base llama-threads:N, beside another base
            set_llama_threads(llm, int(mod[5:]))
        elif mod != "ahead" and not mod.startswith("threads"):
            raise SystemExit(f"unknown modifier {mod!r} in {variant!r}: {VARIANTS}")


def main() -> None:
    parser = probe_parser(__doc__)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--variants", default="default,ggml", help=f"llamahot rows: {VARIANTS}")
    parser.add_argument("--breakdown", type=int, default=0, help="per-token timeline of each llamahot row over N tokens")
    args = parser.parse_args()
    layout = read_moe_layout(args.model)
    kw = dict(n_gpu_layers=-1, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    static_layers = static_layers_for(args.k, layout)
    ram = StockPlaced(args.model, cpu_pattern=EXPERT_TENSOR_PATTERN, **kw)
    static = StockPlaced(args.model, cpu_pattern=static_cpu_pattern(layout.n_moe_layers - static_layers, layout), **kw)
    rows = {"stock RAM": ram, f"stock static {static_layers} layers": static}
    hots = []
    for variant in args.variants.split(","):
        llm = llamahot.Llama(args.model, hot_experts=args.k, slot_device=args.slot_device, gpu_mode="redirect", **kw)
        setup_variant(llm, variant, layout, args.k, args.threads)
        rows[f"llamahot K={args.k} {variant}"] = llm
        hots.append(llm)
    text = hots[0].tokenize(Path("benchmarks/data/heldout_code.txt").read_text().encode(), add_bos=False)
    span = 16 + args.tokens
    windows = [text[i: i + span] for i in range(0, len(text) - span, span)]
    for llm in hots:
        decode_rate(llm, args.tokens, text_tokens=windows[-1])  # first fill of the slots
    rates: dict[str, list[float]] = {name: [] for name in rows}
    hits: dict[str, list[float]] = {name: [] for name in rows}
    per_token: dict[str, dict[str, list[float]]] = {name: {} for name in rows}
    # CPU graphs of the stops by rows: count, ms
    by_rows: dict[str, list[list]] = {name: [[0, 0.0] for _ in range(9)] for name in rows}
    team_start = {name: [0, 0.0, 0.0] for name in rows}  # sliced graphs, first and last thread in (ms)
    node_times = {name: [[0.0, 0.0] for _ in range(4)] for name in rows}  # per sliced node: last in, last out (ms)
    for rep in range(args.reps):
        order = list(rows)[rep % len(rows):] + list(rows)[: rep % len(rows)]
        for name in order:
            llm = rows[name]
            managed = llm in hots
            reset = (lambda m: m.hot_cache.reset()) if managed else None
            rates[name].append(decode_rate(llm, args.tokens, after_prompt=reset, text_tokens=windows[rep]))
            if managed:
                s = llm.hot_cache.stats()
                for key in PER_TOKEN:
                    per_token[name].setdefault(key, []).append(s[key] / max(s["decode_tokens"], 1))
                hits[name].append(s["hit_rate"])
                for i, key in enumerate(("sliced_graphs", "first_thread_in_ms", "last_thread_in_ms")):
                    team_start[name][i] += s[key]
                for k in range(4):
                    node_times[name][k][0] += s["sliced_node_last_in_ms"][k]
                    node_times[name][k][1] += s["sliced_node_last_out_ms"][k]
                for size in range(9):
                    by_rows[name][size][0] += s["cpu_runs_by_rows"][size]
                    by_rows[name][size][1] += s["cpu_ms_by_rows"][size]
    print(f"[{omp_env()}] K={args.k}, {args.reps} repetitions of {args.tokens} teacher-forced tokens")
    names = list(rows)
    for name in names:
        cold = (f", cold CPU {statistics.median(per_token[name]['cpu_compute_ms']):.2f} ms/token, "
                f"hit {statistics.median(hits[name]):.3f}" if per_token[name] else "")
        print(f"  {name}: {statistics.median(rates[name]):.1f} tok/s "
              f"({' '.join(f'{r:.1f}' for r in rates[name])}){cold}")

    def ratio(a: str, b: str) -> str:
        per_rep = [x / y for x, y in zip(rates[a], rates[b])]
        return f"{statistics.median(per_rep):.3f} (min {min(per_rep):.3f}, max {max(per_rep):.3f})"

    for name in names[2:]:
        print(f"  {name}: vs static {ratio(name, names[1])}, vs RAM {ratio(name, names[0])}")
    for name in names[3:]:
        print(f"  {name} vs {names[2]}: {ratio(name, names[2])}")
    for name in names[2:]:
        print(f"  {name}, per token: " + ", ".join(f"{key} {statistics.median(v):.3f}" for key, v in per_token[name].items()))
    if args.breakdown:   # where a token's time goes, each row over the same window
        tables = {name: breakdown_of(rows[name], False, args.breakdown, text_tokens=windows[args.reps % len(windows)],
                                     reduce=lambda v: (statistics.median(v), statistics.mean(v)))
                  for name in names[2:]}
        keys = list(dict.fromkeys(key for t in tables.values() for key in t))
        print(f"  per-token timeline (ms over {args.breakdown} teacher-forced tokens, median / mean): " + " | ".join(names[2:]))
        for key in keys:
            print(f"    {key}: " + " | ".join("%.3f / %.3f" % tables[name].get(key, (0.0, 0.0)) for name in names[2:]))
    # A graph's fixed cost against what each row adds: the mean time of the stops' CPU graphs by size.
    for name in names[2:]:
        n, first, last = team_start[name]
        if n:  # how long the OpenMP team took to start a stop's graph (its sliced nodes' threads)
            print(f"  {name}: first thread in a graph after {first / n * 1e3:.1f} us, last after {last / n * 1e3:.1f} us (mean)")
            print(f"  {name}: sliced nodes, last thread in / out (us after the graph began, mean): " +
                  ", ".join(f"{k}: {t_in / n * 1e3:.1f} / {t_out / n * 1e3:.1f}" for k, (t_in, t_out) in enumerate(node_times[name]) if t_in))
        print(f"  {name}, CPU graphs by rows: " + ", ".join(f"{size if size < 8 else '8+'}: {n} x {ms / n * 1e3:.0f} us"
                                                            for size, (n, ms) in enumerate(by_rows[name]) if n))


if __name__ == "__main__":
    main()
