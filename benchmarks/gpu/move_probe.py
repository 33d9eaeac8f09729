"""Probe: what moving experts' pages in CUDA managed memory costs the decode, by the way they are moved.

    python benchmarks/gpu/move_probe.py MODEL.gguf --out DIR --text TEXT [--k 51] [--tokens 96]

The managed model of gpu_mode="managed" (every layer on the GPU, experts in managed memory), a static hot
set (the K experts per layer the calibrated trace ranks first), teacher-forced decode over TEXT. Between
steps, S swaps a token (one layer's hot expert out, a cold one in; pairs taken round the layers, each pair
moved back the next time it comes up) are issued by one of:
- each:   llamahot's ManagedPages (worker thread; per range cudaMemAdvise preferred location + prefetch);
- batch:  the same advice per range, then one cudaMemPrefetchBatchAsync per direction;
- prefetch: no advice change, one cudaMemPrefetchBatchAsync per direction (the preferred location only
          steers faults, and the GPU never faults on these pages: they are mapped accessed-by).
Rows: tok/s (median over windows), ms per token the caller spent issuing, and the decode's extra ms per
moved expert against no moves. Logits after the moves are checked against the same hot set before them.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llama_cpp  # noqa: F401  (before cuda.bindings: see docs/NOTES.md, import order on the device)
import numpy as np
from cuda.bindings import runtime as rt

from llamahot.benchmark import StockPlaced, finish, last_logits
from llamahot.slots import ManagedPages

sys.path.insert(0, str(Path(__file__).parent))
from managed_probe import Placement, check, expert_tensors, free_vram, last_logits_after, location  # noqa: E402
from probe_common import llama_kw, probe_arguments, text_windows  # noqa: E402


class BatchMover:
    """Moves in a worker thread of its own, one batch prefetch per direction (advice per range first
    unless advise=False)."""

    def __init__(self, advise: bool):
        self.advise = advise
        err, self.stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)
        check(err, "cudaStreamCreateWithFlags")
        self.worker = ThreadPoolExecutor(max_workers=1)
        self.pending = []

    def move(self, ranges: list[tuple[int, int]], to_gpu: bool) -> None:
        self.pending.append(self.worker.submit(self._move, list(ranges), to_gpu))

    def _move(self, ranges, to_gpu: bool) -> None:
        where = location(to_gpu)
        if self.advise:
            for address, nbytes in ranges:
                check(rt.cudaMemAdvise(address, nbytes, rt.cudaMemoryAdvise.cudaMemAdviseSetPreferredLocation,
                                       where), "cudaMemAdvise")
        check(rt.cudaMemPrefetchBatchAsync([a for a, _ in ranges], [n for _, n in ranges], len(ranges), [where], [0],
                                           1, 0, self.stream), "cudaMemPrefetchBatchAsync")

    def wait(self) -> None:
        for f in self.pending:
            f.result()
        self.pending.clear()
        check(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


def main() -> int:
    ap = probe_arguments(__doc__, tokens=96)
    ap.add_argument("--swaps", default="1,4")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = llama_kw(args.threads)
    os.environ["GGML_CUDA_ENABLE_UNIFIED_MEMORY"] = "1"
    llm = StockPlaced(args.model, cpu_pattern=None, **kw)
    del os.environ["GGML_CUDA_ENABLE_UNIFIED_MEMORY"]
    tensors = expert_tensors(llm)
    blocks = sorted({b for b, _ in tensors})
    counts = np.load(Path(__file__).parents[1] / "results/policies-qwen3moe-30b-a3b-routed.trace.npz")["trace"].sum(0)
    order = np.argsort(-counts, axis=1, kind="stable")
    hot = np.zeros(counts.shape, bool)
    np.put_along_axis(hot, order[:, :args.k], True, axis=1)
    placement = Placement(tensors, blocks)
    seconds, calls = placement.place(hot)
    print(f"hot set placed in {seconds:.2f} s ({calls} ranges), free VRAM {free_vram():.2f} GiB", flush=True)
    windows = text_windows(args.model, args.text, args.tokens)[:args.windows]
    reference = last_logits_after(llm, windows[0][:40])

    def ranges_of(layer: int, expert: int) -> list[tuple[int, int]]:
        return [(addr + expert * per, per) for (block, _p), (addr, per, _n) in tensors.items()
                if block == blocks[layer]]

    # Swap pairs round the layers: (layer, hot expert, cold expert); state flips at each use.
    pairs = [(layer, int(order[layer, args.k - 1 - j]), int(order[layer, args.k + j]))
             for j in range(4) for layer in range(len(blocks))]
    swapped = [False] * len(pairs)

    def decode(window, swaps: int, mover) -> tuple[float, float]:
        llm.reset()
        llm.eval(window[:16])
        finish(llm)
        spent = issuing = 0.0
        next_pair = 0
        for i in range(args.tokens):
            start = time.perf_counter()
            if swaps:
                ins, outs = [], []
                for _ in range(swaps):
                    p = next_pair % len(pairs)
                    next_pair += 1
                    layer, a, b = pairs[p]
                    going_out, coming_in = (b, a) if swapped[p] else (a, b)
                    swapped[p] = not swapped[p]
                    outs += ranges_of(layer, going_out)
                    ins += ranges_of(layer, coming_in)
                mover.move(outs, False)
                mover.move(ins, True)
            issued = time.perf_counter()
            llm.eval([window[16 + i]])
            finish(llm)
            spent += time.perf_counter() - start
            issuing += issued - start
        mover.wait()
        # put every pair back so each row starts from the same hot set
        back_in, back_out = [], []
        for p, (layer, a, b) in enumerate(pairs):
            if swapped[p]:
                back_in += ranges_of(layer, a)
                back_out += ranges_of(layer, b)
                swapped[p] = False
        if back_in:
            mover.move(back_out, False)
            mover.move(back_in, True)
            mover.wait()
        return args.tokens / spent, issuing * 1e3 / args.tokens

    class NoMover:
        def move(self, *_):
            pass

        def wait(self):
            pass

    each = ManagedPages()
    movers = {"none": NoMover(), "each": each, "batch": BatchMover(advise=True), "prefetch": BatchMover(advise=False)}
    rows = [("none", 0)] + [(m, s) for s in map(int, args.swaps.split(",")) for m in ("each", "batch", "prefetch")]
    samples: dict[str, list[float]] = {}
    issuing: dict[str, list[float]] = {}
    for rep, window in enumerate(windows):
        for name, swaps in rows[rep % len(rows):] + rows[:rep % len(rows)]:
            key = f"{name} x{swaps}"
            try:
                rate, ms = decode(window, swaps, movers[name])
            except Exception as e:  # one mover failing (e.g. an API the driver lacks) leaves the other rows
                print(f"  {key}: failed: {e!r}", flush=True)
                continue
            samples.setdefault(key, []).append(rate)
            issuing.setdefault(key, []).append(ms)
            print(f"  {key}: {rate:.1f} tok/s, issuing {ms:.3f} ms/token", flush=True)
    after = last_logits_after(llm, windows[0][:40])
    base = statistics.median(samples["none x0"])
    result = {"machine": os.uname().nodename, "k": args.k, "tokens": args.tokens, "samples": samples,
              "issuing_ms": issuing, "bit_identical_after_moves": bool(np.array_equal(reference, after))}
    print(f"\nK={args.k}, {args.tokens} tokens x {len(windows)} windows; logits after all moves identical to "
          f"before: {result['bit_identical_after_moves']}\n")
    print("| mover | experts moved a token (in + out) | decode tok/s | caller ms/token | extra decode ms per moved "
          "expert |\n|---|---|---|---|---|")
    for key, values in samples.items():
        rate = statistics.median(values)
        swaps = int(key.split("x")[1])
        extra = (1e3 / rate - 1e3 / base) / (2 * swaps) if swaps else 0.0
        print(f"| {key.split()[0]} | {2 * swaps} | {rate:.1f} | {statistics.median(issuing[key]):.3f} | "
              f"{extra:.3f} |")
    (out / "move_probe.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
