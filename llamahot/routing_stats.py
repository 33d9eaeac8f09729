"""Statistics of routing traces, next to the figures published for real models.

A trace is int [n_tokens, n_layers, n_expert]: entries routed to each expert per token (0/1 for
single-token decode), as `HotCache.routing_counts()` differences or `policy.replay` take them.
"""
from __future__ import annotations

import numpy as np

# Published for Qwen3-30B-A3B (see issue #5): next-token reuse ~45 % of a layer's selections,
# ~80 % within 8 tokens; 90 % of routing mass on 45-51 % of the experts.
QWEN3_30B_A3B = {"next_token_reuse": 0.45, "reuse_within_8": 0.80, "experts_for_90pct": (0.45, 0.51)}


def experts_covering(trace: np.ndarray, share: float) -> np.ndarray:
    """Per layer: the fraction of experts that together take `share` of the routing."""
    counts = trace.sum(axis=0).astype(np.float64)                 # [n_layers, n_expert]
    ordered = -np.sort(-counts, axis=1)
    cumulative = np.cumsum(ordered, axis=1) / np.maximum(ordered.sum(axis=1, keepdims=True), 1)
    needed = (cumulative < share - 1e-12).sum(axis=1) + 1
    return needed / counts.shape[1]


def reuse(trace: np.ndarray, window: int = 1) -> np.ndarray:
    """Per layer: the share of a token's selections also selected in one of the `window` tokens before."""
    selected = trace > 0                                           # [n_tokens, n_layers, n_expert]
    current = selected[1:]                                         # every token that has a past
    recent = np.zeros_like(current)
    for back in range(1, min(window, len(selected) - 1) + 1):      # recent[t-1]: tokens t-window .. t-1
        recent[back - 1:] |= selected[: len(selected) - back]
    return (current & recent).sum(axis=(0, 2)) / np.maximum(current.sum(axis=(0, 2)), 1)


def report(trace: np.ndarray) -> dict:
    """The statistics of issue #5's routing report, averaged over layers and per layer."""
    per_layer = {
        "experts_for_50pct": experts_covering(trace, 0.5),
        "experts_for_90pct": experts_covering(trace, 0.9),
        "next_token_reuse": reuse(trace, 1),
        "reuse_within_8": reuse(trace, 8),
    }
    return {"mean": {k: float(v.mean()) for k, v in per_layer.items()}, "per_layer": per_layer}


def belady(trace: np.ndarray, k: int) -> dict:
    """Offline optimum for K slots per layer, misses allowed to bypass the cache (they run on the
    CPU): on a miss, load the expert only if it is needed again before the resident needed latest
    (evicting that one); never evict an expert the current token uses. Returns hits, misses,
    hit_rate and loads."""
    n_tokens, n_layers, n_expert = trace.shape
    selected = trace > 0
    hits = misses = loads = 0
    never = n_tokens + 1
    for layer in range(n_layers):
        sel = selected[:, layer, :]
        # next_use[t, e]: the first token after t that selects e.
        next_use = np.full((n_tokens, n_expert), never, dtype=np.int64)
        upcoming = np.full(n_expert, never, dtype=np.int64)
        for t in range(n_tokens - 1, -1, -1):
            next_use[t] = upcoming
            upcoming = np.where(sel[t], t, upcoming)
        resident: set[int] = set()
        for t in range(n_tokens):
            experts = np.flatnonzero(sel[t])
            weight = trace[t, layer, experts]
            for e, w in zip(experts.tolist(), weight.tolist()):
                if e in resident:
                    hits += w
                    continue
                misses += w
                if k == 0:
                    continue
                if len(resident) < k:
                    resident.add(e)
                    loads += 1
                    continue
                candidates = [r for r in resident if not sel[t, r]]
                if not candidates:
                    continue
                victim = max(candidates, key=lambda r: next_use[t, r])
                if next_use[t, e] < next_use[t, victim]:
                    resident.discard(victim)
                    resident.add(e)
                    loads += 1
    total = hits + misses
    return {"hits": int(hits), "misses": int(misses), "hit_rate": hits / total if total else 0.0, "loads": loads}
