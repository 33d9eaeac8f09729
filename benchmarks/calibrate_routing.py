"""Routing statistics of a (synthetic) MoE model next to Qwen3-30B-A3B's published ones.

    python benchmarks/calibrate_routing.py MODEL.gguf [--text benchmarks/data/heldout_code.txt] [--tokens 1024]

Records a teacher-forced routing trace with llama.cpp (llamahot.benchmark.record_trace),
prints measured vs target (mean over layers and the per-layer range) and the hit rate of an LRU
cache holding 40 % of each layer's experts, and writes benchmarks/results/routing_<model>.json.

    ... --simulate [--set bias=0.8 --set context=1.7 ...]

computes the trace in numpy instead (synthetic models with a RoutingSpec only, found by the
file's general.name among llamahot.synth.PRESETS): the construction alone, i.e. layer 0's
recency head and the routers, without the other heads and the experts. It takes a second and
agrees with llama.cpp on ~95 % of the selections (docs/ROUTING.md).

    ... --fit

searches bias, context and window (token fixed) with that simulation, over 16 layers of the
model's shape, for the targets' midpoints; it is how the RoutingSpec defaults were found.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from llamahot import synth
from llamahot.benchmark import record_trace
from llamahot.policy import make_policy, replay
from llamahot.routing_stats import QWEN3_30B_A3B, report

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "heldout_code.txt"
RESIDENCY = 0.4
STATS = ("next_token_reuse", "reuse_within_8", "experts_for_90pct", "experts_for_50pct")


def lru_hit_rate(trace: np.ndarray, residency: float = RESIDENCY, interval: int = 1) -> float:
    """Hit rate of llamahot's LRU policy with round(residency * n_expert) slots per layer, the hot
    set chosen every `interval` tokens (1: a plain per-token LRU cache)."""
    n_layers, n_expert = trace.shape[1:]
    k = round(residency * n_expert)
    return replay(make_policy("lru", n_layers, n_expert, k, interval), trace, interval)["hit_rate"]


def _tensor(plan: synth.TensorPlan, seed: int) -> np.ndarray:
    raw = np.concatenate(list(synth._tensor_chunks(plan, seed)))
    return raw.view(synth._FLOAT_DTYPES[plan.qtype]).astype(np.float32).reshape(tuple(reversed(plan.ne)))


def _rms_norm(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def simulate_trace(spec: synth.ModelSpec, tokens: list[int], seed: int = 0) -> np.ndarray:
    """The routing of `spec`'s construction over `tokens` (positions 0..), in numpy: embeddings,
    layer 0's head 0 (q/k/v, per-head RMS norm, NEOX RoPE, causal softmax, wo) and every router,
    from the generator's own tensors. Everything else (other heads, experts) is left out."""
    plans = {p.name: p for p in synth.plan_tensors(spec)}
    hd, eps, n = spec.head_dim, spec.rms_eps, len(tokens)
    h = _tensor(plans["token_embd.weight"], seed)[np.asarray(tokens)]
    x = _rms_norm(h, eps)
    q, k, v = (x @ _tensor(plans[f"blk.0.attn_{w}.weight"], seed)[:hd].T for w in "qkv")
    q = _rms_norm(q, eps) * _tensor(plans["blk.0.attn_q_norm.weight"], seed)
    k = _rms_norm(k, eps) * _tensor(plans["blk.0.attn_k_norm.weight"], seed)
    angle = np.outer(np.arange(n), synth.rope_thetas(spec))
    cos, sin = np.cos(angle), np.sin(angle)

    def rope(a: np.ndarray) -> np.ndarray:
        lo, hi = a[:, : hd // 2], a[:, hd // 2:]
        return np.concatenate([lo * cos - hi * sin, lo * sin + hi * cos], axis=1)

    scores = rope(q) @ rope(k).T / np.sqrt(hd)
    scores[np.triu_indices(n, 1)] = -np.inf
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    h = h + (weights @ v) @ _tensor(plans["blk.0.attn_output.weight"], seed)[:, :hd].T
    x = _rms_norm(h, eps)
    trace = np.zeros((n, spec.n_layer, spec.n_expert), dtype=np.int64)
    for layer in range(spec.n_layer):
        logits = x @ _tensor(plans[f"blk.{layer}.ffn_gate_inp.weight"], seed).T
        top = np.argpartition(-logits, spec.n_expert_used, axis=1)[:, : spec.n_expert_used]
        np.put_along_axis(trace[:, layer], top, 1, axis=1)
    return trace


FIT_TARGETS = {"next_token_reuse": QWEN3_30B_A3B["next_token_reuse"],
               "reuse_within_8": QWEN3_30B_A3B["reuse_within_8"],
               "experts_for_90pct": sum(QWEN3_30B_A3B["experts_for_90pct"]) / 2}
FIT_FIELDS = ("bias", "context", "window")


def fit(spec: synth.ModelSpec, tokens: list[int], iters: int = 30) -> synth.RoutingSpec:
    """RoutingSpec fields FIT_FIELDS that bring the simulated statistics to FIT_TARGETS."""
    spec = dataclasses.replace(spec, n_layer=16)

    def loss(x: np.ndarray) -> float:
        bias, context, window = x
        if bias <= 0 or context <= 0 or not 2 <= window <= 40:
            return 10.0
        routing = dataclasses.replace(spec.routing, bias=bias, context=context, window=window)
        mean = report(simulate_trace(dataclasses.replace(spec, routing=routing), tokens))["mean"]
        return sum((mean[name] - target) ** 2 for name, target in FIT_TARGETS.items())

    from scipy.optimize import minimize   # pip install -e '.[bench]'

    start = np.array([getattr(spec.routing, name) for name in FIT_FIELDS])
    simplex = np.vstack([start, start + np.diag(start * np.array([0.2, 0.2, 0.3]))])
    result = minimize(loss, start, method="Nelder-Mead", options={"initial_simplex": simplex, "maxiter": iters})
    print(f"fit: squared error {result.fun:.2e}")
    return dataclasses.replace(spec.routing, **dict(zip(FIT_FIELDS, (round(float(v), 3) for v in result.x))))


def _model_spec(model: str, overrides: list[str]) -> synth.ModelSpec:
    import gguf
    field = gguf.GGUFReader(model).get_field("general.name")
    name = bytes(field.parts[field.data[0]]).decode()
    if name not in synth.PRESETS or synth.PRESETS[name].routing is None:
        raise SystemExit(f"--simulate needs a synthetic model with a RoutingSpec; {model} is {name!r}")
    spec = synth.PRESETS[name]
    pairs = (item.split("=", 1) for item in overrides)
    changes = {key: type(getattr(spec.routing, key))(value) for key, value in pairs}
    return dataclasses.replace(spec, routing=dataclasses.replace(spec.routing, **changes))


def _tokens(model: str, text: str, n_tokens: int) -> list[int]:
    import llama_cpp
    vocab = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    return vocab.tokenize(text.encode(), add_bos=False)[:n_tokens]  # as record_trace reads it


def measure(trace: np.ndarray) -> dict:
    """Routing statistics (mean and per-layer min/max) and LRU hit rates of a trace."""
    per_layer = report(trace)["per_layer"]
    out = {name: {"mean": float(per_layer[name].mean()), "min": float(per_layer[name].min()),
                  "max": float(per_layer[name].max())} for name in STATS}
    out["lru_hit_rate_40pct"] = {"per_token": lru_hit_rate(trace, interval=1),
                                 "interval_60": lru_hit_rate(trace, interval=60)}
    return out


def print_table(stats: dict) -> None:
    targets = {"next_token_reuse": "0.45", "reuse_within_8": "0.80",
               "experts_for_90pct": "{:.2f}-{:.2f}".format(*QWEN3_30B_A3B["experts_for_90pct"]),
               "experts_for_50pct": "-"}
    print(f"{'statistic':<20s} {'target':>9s} {'mean':>7s} {'min':>7s} {'max':>7s}")
    for name in STATS:
        s = stats[name]
        print(f"{name:<20s} {targets[name]:>9s} {s['mean']:7.3f} {s['min']:7.3f} {s['max']:7.3f}")
    lru = stats["lru_hit_rate_40pct"]
    print(f"{'LRU hit @40% slots':<20s} {'0.90-0.95':>9s} {lru['per_token']:7.3f}   (per-token LRU; "
          f"rebalanced every 60 tokens: {lru['interval_60']:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="text to read (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--simulate", action="store_true", help="numpy simulation of the construction")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="with --simulate/--fit: override a RoutingSpec field")
    parser.add_argument("--fit", action="store_true",
                        help="search bias, context and window with the simulation, then report the result")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/routing_<model>[_sim].json)")
    args = parser.parse_args()

    text = Path(args.text).read_text()
    start = time.monotonic()
    if args.fit:
        spec = _model_spec(args.model, args.set)
        tokens = _tokens(args.model, text, args.tokens)
        spec = dataclasses.replace(spec, routing=fit(spec, tokens))
        args.simulate = True
        trace = simulate_trace(spec, tokens)
    elif args.simulate:
        spec = _model_spec(args.model, args.set)
        trace = simulate_trace(spec, _tokens(args.model, text, args.tokens))
    else:
        trace = record_trace(args.model, text, args.tokens)
    wall = time.monotonic() - start
    n_tokens, n_layers, n_expert = trace.shape
    source = "numpy simulation of the construction" if args.simulate else "llama.cpp teacher-forced decode"
    print(f"{Path(args.model).name}: {n_tokens} tokens of {Path(args.text).name}, {n_layers} MoE layers x "
          f"{n_expert} experts ({source}, {wall:.0f} s)")
    if args.simulate:
        print("routing:", spec.routing)
    stats = measure(trace)
    print_table(stats)

    stem = Path(args.model).stem + ("_sim" if args.simulate else "")
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"routing_{stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": Path(args.model).name, "text": Path(args.text).name, "tokens": n_tokens,
              "source": source, "wall_s": round(wall, 1), "targets": QWEN3_30B_A3B, "measured": stats,
              "per_layer": {name: [round(float(v), 4) for v in values]
                            for name, values in report(trace)["per_layer"].items()}}
    if args.simulate:
        record["routing"] = dataclasses.asdict(spec.routing)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
