"""Probe: experts in CUDA managed memory, hot ones migrated to VRAM, cold ones read by the GPU over PCIe.

    GGML is not patched: llama.cpp allocates its CUDA buffers with cudaMallocManaged when
    GGML_CUDA_ENABLE_UNIFIED_MEMORY is set, so the whole model is loaded "on the GPU" and every node
    runs in llama.cpp's own CUDA graph (no splits, no callback). Then, per expert matrix, cudaMemAdvise
    says where it lives: the hot experts' pages in VRAM (preferred location device), the cold ones in
    host memory (preferred location host) and mapped in the GPU's page tables (accessed-by device), so
    the expert kernels read them over PCIe without faults or migration.

    python benchmarks/gpu/managed_probe.py MODEL.gguf --out DIR --text TEXT [--k 51] [--reps 3]

Rows, interleaved, teacher-forced decode over TEXT (16 prompt tokens + --tokens steps), 16 threads:
stock RAM (experts in pinned host memory), stock static at the VRAM of K slots, llamahot K (the
callback path, defaults), managed K (hot set: the K experts per layer llamahot's routing counts rank
first over the same windows), managed with every expert in host memory, and managed with every expert
in VRAM. Also: free VRAM at each step, the cost of migrating one expert per layer each way, logits of
managed K against managed all-VRAM (the same kernels: they should be bit-identical).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
from cuda.bindings import runtime as rt

import llamahot
from llamahot.benchmark import StockPlaced, decode_rate, last_logits
from llamahot.model_info import EXPERT_TENSOR_PATTERN, read_moe_layout

sys.path.insert(0, str(Path(__file__).parent))
from bench import prefill_rate, prefill_tokens, static_cpu_pattern, static_layers_for  # noqa: E402


class Tensor(ctypes.Structure):
    pass


Tensor._fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                   ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                   ("flags", ctypes.c_int32), ("src", ctypes.POINTER(Tensor) * 10),
                   ("view_src", ctypes.POINTER(Tensor)), ("view_offs", ctypes.c_size_t),
                   ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
                   ("padding", ctypes.c_char * 8)]

WEIGHT = re.compile(rb"blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.weight")


def expert_tensors(llm) -> dict[tuple[int, str], tuple[int, int, int]]:
    """(block, proj) -> (data address, bytes per expert, n_expert), read from the nodes of one decode
    in a second, throw-away context on the same model (its eval callback sees every node's sources)."""
    found: dict[tuple[int, str], tuple[int, int, int]] = {}

    def look(t, ask, _user):
        if ask:
            node = ctypes.cast(t, ctypes.POINTER(Tensor)).contents
            for s in node.src:
                if s:
                    m = WEIGHT.fullmatch(s.contents.name)
                    if m:
                        found[(int(m.group(1)), m.group(2).decode())] = (
                            s.contents.data, s.contents.nb[2], s.contents.ne[2])
        return not ask  # never stop a run: only look

    callback = llama_cpp.ggml_backend_sched_eval_callback(look)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 64, 64, 64
    params.cb_eval = callback
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    tokens = (llama_cpp.llama_token * 1)(1)
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, 1)) == 0
    llama_cpp.llama_free(ctx)
    return found


def check(result, what: str):
    err = result[0] if isinstance(result, tuple) else result
    if err != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what}: {err}")
    return result[1:] if isinstance(result, tuple) and len(result) > 1 else None


def location(device: bool):
    loc = rt.cudaMemLocation()
    loc.type = rt.cudaMemLocationType.cudaMemLocationTypeDevice if device else rt.cudaMemLocationType.cudaMemLocationTypeHost
    loc.id = 0
    return loc


def free_vram() -> float:
    err, free, _ = rt.cudaMemGetInfo()
    return free / 2**30


class Placement:
    """Where each expert of each tensor lives; runs of equal placement are advised and prefetched at once."""

    def __init__(self, tensors: dict, blocks: list[int]):
        self.tensors = tensors
        self.blocks = blocks
        err, self.stream = rt.cudaStreamCreate()
        check(err, "cudaStreamCreate")
        gpu = location(True)
        for (addr, per, n) in tensors.values():
            check(rt.cudaMemAdvise(addr, per * n, rt.cudaMemoryAdvise.cudaMemAdviseSetAccessedBy, gpu), "accessed-by")

    def place(self, hot: np.ndarray) -> tuple[float, int]:
        """hot[layer, expert] -> advise + prefetch; returns (seconds, calls)."""
        start, calls = time.perf_counter(), 0
        for (block, _proj), (addr, per, n) in self.tensors.items():
            row = hot[self.blocks.index(block)]
            e = 0
            while e < n:
                f = e
                while f < n and row[f] == row[e]:
                    f += 1
                loc = location(bool(row[e]))
                check(rt.cudaMemAdvise(addr + e * per, (f - e) * per,
                                       rt.cudaMemoryAdvise.cudaMemAdviseSetPreferredLocation, loc), "preferred")
                check(rt.cudaMemPrefetchAsync(addr + e * per, (f - e) * per, loc, 0, self.stream), "prefetch")
                calls += 1
                e = f
        check(rt.cudaStreamSynchronize(self.stream), "sync")
        return time.perf_counter() - start, calls

    def move(self, moves: list[tuple[int, int, bool]]) -> float:
        """[(layer, expert, to_device)] one by one (a rebalance's cost); returns seconds."""
        start = time.perf_counter()
        for layer, expert, to_device in moves:
            loc = location(to_device)
            for (block, _proj), (addr, per, n) in self.tensors.items():
                if block == self.blocks[layer]:
                    check(rt.cudaMemAdvise(addr + expert * per, per,
                                           rt.cudaMemoryAdvise.cudaMemAdviseSetPreferredLocation, loc), "preferred")
                    check(rt.cudaMemPrefetchAsync(addr + expert * per, per, loc, 0, self.stream), "prefetch")
        check(rt.cudaStreamSynchronize(self.stream), "sync")
        return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--k", type=int, default=51)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--no-llamahot", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layout = read_moe_layout(args.model)
    kw = dict(n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=args.threads, n_threads_batch=args.threads,
              n_gpu_layers=-1, verbose=False)
    t0 = time.perf_counter()
    rows: dict[str, object] = {}
    rows["stock RAM"] = StockPlaced(args.model, cpu_pattern=EXPERT_TENSOR_PATTERN, **kw)
    on_cpu = layout.n_moe_layers - static_layers_for(args.k, layout)
    rows[f"stock static ({layout.n_moe_layers - on_cpu} layers)"] = StockPlaced(
        args.model, cpu_pattern=static_cpu_pattern(on_cpu, layout), **kw)
    hot = None
    if not args.no_llamahot:
        hot = rows[f"llamahot K={args.k}"] = llamahot.Llama(args.model, hot_experts=args.k, slot_device="cuda",
                                                            gpu_mode="redirect", **kw)
    vram_before = free_vram()
    os.environ["GGML_CUDA_ENABLE_UNIFIED_MEMORY"] = "1"
    managed = StockPlaced(args.model, cpu_pattern=None, **kw)
    del os.environ["GGML_CUDA_ENABLE_UNIFIED_MEMORY"]
    vram_managed = free_vram()
    print(f"loaded in {time.perf_counter() - t0:.1f} s; free VRAM {vram_before:.2f} GiB before the managed "
          f"model, {vram_managed:.2f} after", flush=True)
    tensors = expert_tensors(managed)
    blocks = sorted({b for b, _ in tensors})
    print(f"{len(tensors)} expert tensors in {len(blocks)} blocks; first {next(iter(tensors.items()))}", flush=True)

    ram = rows["stock RAM"]
    text_ids = ram.tokenize(Path(args.text).read_bytes(), add_bos=False)
    size = 16 + args.tokens
    windows = [text_ids[i:i + size] for i in range(0, len(text_ids) - size + 1, size)]
    long_prompt = prefill_tokens(ram, 512)
    runs: dict[str, int] = {}
    samples: dict[str, list[float]] = {}
    prefills: dict[str, list[float]] = {}

    def measure(name, llm):
        run = runs[name] = runs.get(name, -1) + 1
        samples.setdefault(name, []).append(decode_rate(llm, args.tokens, text_tokens=windows[run % len(windows)]))

    def block(named: dict, reps: int, prefill: bool = True):
        items = list(named.items())
        for rep in range(reps):
            for name, llm in items[rep % len(items):] + items[:rep % len(items)]:
                measure(name, llm)
        if prefill:
            for name, llm in items:
                prefills[name] = [prefill_rate(llm, long_prompt) for _ in range(3)]

    results: dict = {"machine": os.uname().nodename, "k": args.k, "vram_free_gib": {"before managed": vram_before,
                     "after managed load": vram_managed}}
    # 1. every expert in VRAM (managed memory, all resident): the reference logits and T_gpu.
    block({"managed all-VRAM": managed}, 2, prefill=False)
    reference = [last_logits_after(managed, windows[0][:16 + i]) for i in (0, 8, 31)]
    # 2. llamahot's routing counts over the windows the rows decode -> the managed hot set.
    if hot is not None:
        block({f"llamahot K={args.k}": hot}, 2, prefill=False)
        counts = hot.hot_cache.routing_counts()
    else:
        counts = np.load(Path(__file__).parents[2] / "benchmarks/results/policies-qwen3moe-30b-a3b-routed.trace.npz")[
            "trace"].sum(axis=0)
    order = np.argsort(-counts, axis=1, kind="stable")
    hot_set = np.zeros(counts.shape, bool)
    np.put_along_axis(hot_set, order[:, :args.k], True, axis=1)
    in_sample_hit = float((counts * hot_set).sum() / max(counts.sum(), 1))
    placement = Placement(tensors, blocks)
    seconds, calls = placement.place(hot_set)
    results["place_hot_set_s"], results["place_calls"] = seconds, calls
    results["vram_free_gib"]["managed K"] = free_vram()
    print(f"placed the hot set in {seconds:.2f} s ({calls} ranges); free VRAM {free_vram():.2f} GiB; "
          f"in-sample hit rate of the hot set {in_sample_hit:.3f}", flush=True)
    after = [last_logits_after(managed, windows[0][:16 + i]) for i in (0, 8, 31)]
    results["bit_identical_to_all_vram"] = all(np.array_equal(a, b) for a, b in zip(reference, after))
    results["max_abs_diff_vs_all_vram"] = float(max(np.abs(a - b).max() for a, b in zip(reference, after)))
    # 3. one expert per layer swapped each way (a rebalance), timed, then back.
    moves_in = [(layer, int(order[layer, args.k]), True) for layer in range(len(blocks))]
    moves_out = [(layer, int(order[layer, args.k - 1]), False) for layer in range(len(blocks))]
    results["swap_48_in_s"] = placement.move(moves_in)
    results["swap_48_out_s"] = placement.move(moves_out)
    placement.move([(l, e, not d) for l, e, d in moves_in + moves_out])
    print(f"one expert per layer: in {results['swap_48_in_s'] * 1e3:.1f} ms, out "
          f"{results['swap_48_out_s'] * 1e3:.1f} ms", flush=True)
    # 4. the speed table at K.
    named = dict(rows)
    named[f"managed K={args.k}"] = managed
    block(named, args.reps)
    results["vram_free_gib"]["managed K after decode"] = free_vram()
    # 5. every expert in host memory (zero copy over PCIe) against stock RAM.
    seconds, _ = placement.place(np.zeros_like(hot_set))
    results["vram_free_gib"]["managed all-host"] = free_vram()
    block({"stock RAM": ram, "managed all-host": managed}, 2)
    results["vram_free_gib"]["managed all-host after decode"] = free_vram()
    results["decode_tok_s"] = {n: statistics.median(v) for n, v in samples.items()}
    results["decode_samples"] = samples
    results["prefill_tok_s"] = {n: statistics.median(v) for n, v in prefills.items()}
    results["in_sample_hit"] = in_sample_hit
    if hot is not None:
        st = hot.hot_cache.stats()
        results["llamahot_hit_rate"] = st["hit_rate"]
    (out / "managed_probe.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    ram_rate = results["decode_tok_s"]["stock RAM"]
    static = next(v for n, v in results["decode_tok_s"].items() if n.startswith("stock static"))
    print(f"\n| row | decode tok/s | vs stock RAM | vs static | prefill tok/s |\n|---|---|---|---|---|")
    for name, rate in results["decode_tok_s"].items():
        pf = results["prefill_tok_s"].get(name)
        print(f"| {name} | {rate:.1f} | {rate / ram_rate:.3f} | {rate / static:.3f} | "
              f"{'' if pf is None else f'{pf:.0f}'} |")
    print(json.dumps({k: v for k, v in results.items() if k not in ("decode_samples",)}, indent=1, default=float))
    return 0


def last_logits_after(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return last_logits(llm).copy()


if __name__ == "__main__":
    sys.exit(main())
