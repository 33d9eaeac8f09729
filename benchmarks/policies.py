"""Routing statistics and hit rate vs K for every policy and the offline optimum (Belady with
bypass), on a routing trace recorded by teacher-forced decoding of real text; a parameter sweep
for the default policy; JSON and PNG out.

    python benchmarks/policies.py MODEL.gguf [--text FILE] [--tokens 4096] [--intervals 4,60] [--plot OUT.png]

Default text: benchmarks/data/heldout_code.txt (Python modules the trained model never saw).
The trace is int [tokens, MoE layers, experts] (routing per token, from the shim's counters) and is
cached next to the JSON (`--trace`), so a rerun of the analysis does not decode again.
Random-weight models route almost uniformly, so their curves sit near K/n_expert.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np

from llamahot.benchmark import record_trace
from llamahot.policy import POLICIES, DecayedFrequency, make_policy, replay
from llamahot.routing_stats import QWEN3_30B_A3B, belady, report

HELDOUT = Path(__file__).parent / "data" / "heldout_code.txt"
# Tokens played as the prompt (they fill the slots) before hits are scored, for every setting alike.
WARMUP = 60
STATS = ("experts_for_50pct", "experts_for_90pct", "next_token_reuse", "reuse_within_8")


def residency_ks(n_expert: int) -> list[int]:
    """K at 1/16 .. 3/4 of the experts, with 40 % (issue #5's operating point) included."""
    fractions = (1 / 16, 1 / 8, 1 / 4, 0.4, 1 / 2, 3 / 4)
    return sorted({max(1, round(f * n_expert)) for f in fractions})


def curves(trace: np.ndarray, interval: int) -> dict[int, dict[str, dict]]:
    """Per K: every policy (its defaults, rebalanced every `interval` tokens) and Belady."""
    n_layers, n_expert = trace.shape[1:]
    out = {}
    for k in residency_ks(n_expert):
        row = {name: replay(make_policy(name, n_layers, n_expert, k, interval), trace, interval, warmup=WARMUP)
               for name in POLICIES}
        row["belady"] = belady(trace[WARMUP:], k)        # the same tokens replay() scores
        out[k] = row
    return out


def sweep_default(trace: np.ndarray, k: int) -> list[dict]:
    """The default policy's parameters: rebalance interval, half-life and hysteresis margin.

    Scored by hit rate and by loads (expert copies) per token per layer: copies use PCIe time that a
    decode step otherwise leaves idle, but each one must be reused a few times to pay for itself.
    """
    n_tokens, n_layers, n_expert = trace.shape
    rows = []
    for interval, half_life, margin in itertools.product((1, 4, 16, 60), (8, 32, 128), (0.0, 0.25, 1.0)):
        policy = DecayedFrequency(n_layers, n_expert, k, half_life=half_life, margin=margin)
        result = replay(policy, trace, interval, warmup=WARMUP)
        rows.append({"interval": interval, "half_life": half_life, "margin": margin,
                     "hit_rate": result["hit_rate"],
                     "loads_per_token_layer": result["loads"] / (n_tokens * n_layers)})
    return sorted(rows, key=lambda r: -r["hit_rate"])


def plot(path: Path, name: str, n_expert: int, tables: dict[int, dict[int, dict[str, dict]]]) -> None:
    """One panel per rebalance interval: hit rate vs residency for every policy and Belady."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 4.2), dpi=110, squeeze=False)
    for ax, (interval, table) in zip(axes[0], sorted(tables.items())):
        ks = sorted(table)
        for policy in [*POLICIES, "belady"]:
            ax.plot([100 * k / n_expert for k in ks], [table[k][policy]["hit_rate"] for k in ks], marker="o",
                    linestyle="--" if policy == "belady" else "-", label=policy)
        ax.plot([0, 100], [0, 1], color="grey", linewidth=0.8, label="uniform routing")
        ax.set_xlabel("hot experts per layer (% of experts)")
        ax.set_ylabel("hit rate")
        ax.set_title(f"{name}: rebalance every {interval} tokens", fontsize=10)
        ax.set_xlim(0, 80)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--text", type=Path, default=HELDOUT, help="text to read (default: held-out code)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--intervals", default="4,60", help="rebalance intervals of the curves")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/policies-<model>.json)")
    parser.add_argument("--trace", type=Path, default=None, help="trace cache (default: beside the JSON)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of hit rate vs K")
    args = parser.parse_args()
    name = Path(args.model).stem
    out = args.out or Path("benchmarks/results") / f"policies-{name}.json"
    trace_path = args.trace or out.with_suffix(".trace.npz")
    # The cache names the model file it was recorded from (its SHA-256): a retrained model with the
    # same name records a new trace instead of reusing the old one's.
    model_sha = hashlib.sha256(Path(args.model).read_bytes()).hexdigest()
    cached = np.load(trace_path) if trace_path.exists() else None
    if cached is not None and "model_sha256" in cached and str(cached["model_sha256"]) == model_sha \
            and len(cached["trace"]) >= args.tokens:
        trace = cached["trace"][:args.tokens].astype(np.int64)
    else:
        start = time.monotonic()
        trace = record_trace(args.model, args.text.read_text(), args.tokens)
        print(f"trace: {len(trace)} tokens in {time.monotonic() - start:.1f}s")
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(trace_path, trace=trace.astype(np.uint8), model_sha256=model_sha)
    n_tokens, n_layers, n_expert = trace.shape
    stats = report(trace)
    print(f"{name}: {n_tokens} tokens of {args.text.name}, {n_layers} MoE layers x {n_expert} experts, "
          f"{int(trace[0].sum() // n_layers)} used")
    print(f"{'layer':>6s} " + " ".join(f"{s:>18s}" for s in STATS))
    for layer in range(n_layers):
        print(f"{layer:6d} " + " ".join(f"{stats['per_layer'][s][layer]:18.3f}" for s in STATS))
    print(f"{'mean':>6s} " + " ".join(f"{stats['mean'][s]:18.3f}" for s in STATS))
    lo, hi = QWEN3_30B_A3B["experts_for_90pct"]
    print(f"{'Qwen3':>6s} {'':>18s} {f'{lo}-{hi}':>18s} {QWEN3_30B_A3B['next_token_reuse']:18.2f} "
          f"{QWEN3_30B_A3B['reuse_within_8']:18.2f}   (published, Qwen3-30B-A3B)")

    tables = {}
    for interval in map(int, args.intervals.split(",")):
        table = tables[interval] = curves(trace, interval)
        print(f"\nhit rate (loads per token per layer) vs K, rebalance every {interval} tokens")
        print(f"{'K':>5s} " + " ".join(f"{p:>16s}" for p in [*POLICIES, "belady"]))
        for k, row in table.items():
            print(f"{k:5d} " + " ".join(f"{row[p]['hit_rate']:7.3f} ({row[p]['loads'] / (n_tokens * n_layers):5.2f})"
                                        for p in [*POLICIES, "belady"]))

    k40 = max(1, round(0.4 * n_expert))
    sweep = sweep_default(trace, k40)
    print(f"\ndefault policy (decayed frequency) at K={k40}: best settings by hit rate")
    print(f"{'interval':>8s} {'half_life':>9s} {'margin':>6s} {'hit rate':>8s} {'loads/token/layer':>17s}")
    for row in sweep[:8]:
        print(f"{row['interval']:8d} {row['half_life']:9d} {row['margin']:6.2f} {row['hit_rate']:8.3f} "
              f"{row['loads_per_token_layer']:17.3f}")

    out.parent.mkdir(parents=True, exist_ok=True)
    serial = {interval: {k: {p: dict(r) for p, r in row.items()} for k, row in table.items()}
              for interval, table in tables.items()}
    out.write_text(json.dumps({
        "model": Path(args.model).name, "text": args.text.name, "tokens": n_tokens, "n_layers": n_layers,
        "n_expert": n_expert, "routing": stats["mean"],
        "routing_per_layer": {s: [float(x) for x in stats["per_layer"][s]] for s in STATS},
        "curves_by_interval": serial, "default_sweep_k": k40, "default_sweep": sweep}, indent=1) + "\n")
    if args.plot:
        plot(args.plot, name, n_expert, tables)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
