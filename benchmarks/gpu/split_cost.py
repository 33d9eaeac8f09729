"""What one layer with its experts in host memory costs stock llama-cpp-python beyond the experts' own work.

Issue #4's roofline T(h) = T_gpu + (1 - h) * T_cold prices a cold expert at its CPU time and nothing
else. But with any expert of a layer in host memory, llama.cpp's scheduler cuts the GPU graph there:
a split per such layer, each synchronized, with its inputs copied to the CPU split and its output back.
This probe measures that cost without llamahot, with experts that cost almost nothing: Qwen3-30B-A3B's
shapes (48 layers, 128 experts, 8 used, n_embd 2048, its attention) with a tiny expert FFN (width W,
Q8_0), decoded by stock llama-cpp-python with the experts of the first L layers in host memory and the
others on the GPU (like `--n-cpu-moe L`). T(L) = T(0) + L * (c_split + 8 * t_row(W)); two widths give
c_split by extrapolating the slope to W = 0.

    python benchmarks/gpu/split_cost.py OUT_DIR [--widths 32,64] [--layers 0,12,24,48] [--reps 5]
Writes OUT_DIR/split_cost.json and prints a table (device only: needs a CUDA build).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import llamahot  # before numpy: numpy first made the device's CUDA build of llama_cpp die silently at load
from llamahot import synth
from llamahot.benchmark import StockPlaced, decode_rate
from llamahot.model_info import read_moe_layout

sys.path.insert(0, str(Path(__file__).parent))
from bench import static_cpu_pattern  # noqa: E402


def tiny_expert_model(width: int, folder: Path) -> Path:
    """Qwen3-30B-A3B's shapes with routed experts `width` wide (Q8_0: 32-wide blocks)."""
    path = folder / f"qwen3moe-30b-a3b-ff{width}.gguf"
    if not path.exists():
        spec = dataclasses.replace(synth.PRESETS["qwen3moe-30b-a3b"], name=f"qwen3moe-30b-a3b-ff{width}",
                                   n_ff_exp=width, expert_qtype=synth.QType.Q8_0)
        synth.synth_model(path, spec)
    return path


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--models", default="/tmp/models")
    parser.add_argument("--widths", default="32,64")
    parser.add_argument("--layers", default="0,12,24,48")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.models)
    folder.mkdir(parents=True, exist_ok=True)
    widths = [int(w) for w in args.widths.split(",")]
    layers = [int(n) for n in args.layers.split(",")]

    instances = {}
    for width in widths:
        path = tiny_expert_model(width, folder)
        layout = read_moe_layout(str(path))
        for n in layers:
            instances[(width, n)] = StockPlaced(str(path), cpu_pattern=static_cpu_pattern(n, layout), n_gpu_layers=-1,
                                                n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                                                verbose=False)
    samples = {key: [] for key in instances}
    for _ in range(args.reps):   # interleaved: the machine drifts between repetitions
        for key, llm in instances.items():
            samples[key].append(1000.0 / decode_rate(llm, args.tokens))

    ms = {key: statistics.median(v) for key, v in samples.items()}
    lines = ["| expert width | layers with experts in host memory | ms/token (median) | over L=0 per layer (µs) |",
             "|---|---|---|---|"]
    per_layer = {}
    for width in widths:
        base = ms.get((width, 0))
        for n in layers:
            extra = "" if base is None or n == 0 else f"{1000.0 * (ms[(width, n)] - base) / n:.1f}"
            lines.append(f"| {width} | {n} | {ms[(width, n)]:.3f} | {extra} |")
        per_layer[width] = 1000.0 * slope([float(n) for n in layers], [ms[(width, n)] for n in layers])
    lines.append("")
    lines += [f"slope at width {w}: {per_layer[w]:.1f} µs per layer in host memory" for w in widths]
    if len(widths) >= 2:
        split = per_layer[widths[0]] - widths[0] * (per_layer[widths[1]] - per_layer[widths[0]]) / (widths[1] - widths[0])
        lines.append(f"extrapolated to width 0 (the split alone, c_split): {split:.1f} µs per layer")
    else:
        split = None
    table = "\n".join(lines)
    print(table)
    (out / "split_cost.md").write_text(table + "\n")
    (out / "split_cost.json").write_text(json.dumps({
        "tokens": args.tokens, "reps": args.reps, "threads": args.threads,
        "ms_per_token": {f"{w}/{n}": v for (w, n), v in ms.items()},
        "samples_ms": {f"{w}/{n}": v for (w, n), v in samples.items()},
        "slope_us_per_layer": per_layer, "c_split_us": split}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
