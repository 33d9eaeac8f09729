"""Which experts are hot: policies in plain numpy, no llama imports (testable on recorded traces).

A policy sees routing as count deltas, `observe(delta, n_tokens, last_used)` with delta int64
[n_layers, n_expert] = entries routed to each expert since the last call and last_used int64
[n_layers, n_expert] = the token (1-based clock, 0 = never) of each expert's latest routing, and answers
`choose(resident)`: the desired hot set, a bool [n_layers, n_expert] mask with at most k experts
per layer, given the resident mask. The slot manager turns the difference into copies.
"""
from __future__ import annotations

from collections import deque

import numpy as np


def swap_plan(score: np.ndarray, resident: np.ndarray, k: int, margin: float = 0.0) -> np.ndarray:
    """Desired hot mask from per-expert scores, changing as little as needed.

    Empty slots are filled with the best-scoring non-residents that were routed to at all
    (score > 0). A resident is replaced only by a newcomer whose score beats it by `margin`
    (relative): the best newcomer against the weakest resident, the second against the second
    weakest, and so on.
    Layers are independent. Most layers change nothing at a rebalance (no empty slot, and the best
    newcomer does not beat the weakest resident), and two max/min reductions find them: only the
    others are sorted (~0.05 ms for 48 layers x 128 experts, against ~0.3 ms sorting every layer).
    """
    if k == 0:
        return np.zeros_like(resident)
    newcomer = ~resident & (score > 0)
    best_new = np.where(newcomer, score, -np.inf).max(axis=1)
    weakest = np.where(resident, score, np.inf).min(axis=1)
    changes = (resident.sum(axis=1) < k) & newcomer.any(axis=1)
    changes |= best_new > weakest * (1.0 + margin) + 1e-12
    desired = resident.copy()
    if changes.any():
        desired[changes] = _swap_plan_layers(score[changes], resident[changes], newcomer[changes], k, margin)
    return desired


def _swap_plan_layers(score: np.ndarray, resident: np.ndarray, newcomer: np.ndarray, k: int, margin: float) -> np.ndarray:
    """swap_plan over every layer given, each sorted (all layers at once in numpy); newcomer as swap_plan's."""
    n_layers, n_expert = score.shape
    desired = resident.copy()
    rows = np.arange(n_layers)[:, None]
    pos = np.arange(n_expert)[None, :]
    # Per layer: newcomers best first (ties by index), then every other expert.
    order_new = np.argsort(np.where(newcomer, -score, np.inf), axis=1, kind="stable")
    n_new = newcomer.sum(axis=1)
    filled = np.clip(np.minimum(k - resident.sum(axis=1), n_new), 0, None)   # empty slots first
    desired[rows, order_new] |= pos < filled[:, None]
    # The remaining newcomers against the residents, weakest first (ties by index), pair by pair,
    # up to the first pair where the newcomer does not win by the margin.
    order_res = np.argsort(np.where(desired, score, np.inf), axis=1, kind="stable")
    n_pairs = np.minimum(n_new - filled, desired.sum(axis=1))
    new_idx = np.take_along_axis(order_new, np.minimum(pos + filled[:, None], n_expert - 1), axis=1)
    wins = (np.take_along_axis(score, new_idx, axis=1) >
            np.take_along_axis(score, order_res, axis=1) * (1.0 + margin) + 1e-12)
    swap = np.logical_and.accumulate((pos < n_pairs[:, None]) & wins, axis=1)
    layer = np.broadcast_to(rows, swap.shape)[swap]
    desired[layer, order_res[swap]] = False
    desired[layer, new_idx[swap]] = True
    return desired


class DecayedFrequency:
    """Default: exponentially decayed routing counts with hysteresis.

    A routing event loses half its weight after `half_life` tokens; a newcomer must beat the
    weakest resident's score by `margin` (relative) to replace it, so near-ties do not thrash.
    Defaults (half-life 128 tokens, margin 0.25, with rebalances every 4 tokens) were chosen on
    teacher-forced routing traces of the trained and the calibrated model (benchmarks/RESULTS.md).
    """

    name = "decayed"

    def __init__(self, n_layers: int, n_expert: int, k: int, *, half_life: float = 128.0, margin: float = 0.25):
        self.k = k
        self.margin = margin
        self.decay_per_token = 0.5 ** (1.0 / half_life)
        self.score = np.zeros((n_layers, n_expert), dtype=np.float64)

    def observe(self, delta: np.ndarray, n_tokens: int, last_used: np.ndarray | None = None) -> None:
        self.score *= self.decay_per_token ** n_tokens
        self.score += delta

    def choose(self, resident: np.ndarray) -> np.ndarray:
        return swap_plan(self.score, resident, self.k, self.margin)

    def hotness(self) -> np.ndarray:
        return self.score


class LRU:
    """Least recently used: the k experts routed to most recently (per-token recency from the
    shim's clock; experts routed at the same token tie, broken by how often they were routed in
    the last interval)."""

    name = "lru"

    def __init__(self, n_layers: int, n_expert: int, k: int):
        self.k = k
        self.last_used = np.zeros((n_layers, n_expert), dtype=np.int64)
        self.last_count = np.zeros((n_layers, n_expert), dtype=np.int64)
        self.clock = 0

    def observe(self, delta: np.ndarray, n_tokens: int, last_used: np.ndarray | None = None) -> None:
        self.clock += n_tokens
        if last_used is not None:
            self.last_used = np.array(last_used, dtype=np.int64)
        else:  # no per-token clock: everything routed in this chunk counts as just used
            self.last_used[delta > 0] = self.clock
        self.last_count = np.array(delta)

    def choose(self, resident: np.ndarray) -> np.ndarray:
        score = self.last_used.astype(np.float64) + self.last_count / (self.last_count.max() + 1.0)
        return swap_plan(score, resident, self.k)

    def hotness(self) -> np.ndarray:
        return self.last_used.astype(np.float64)


class WindowLFU:
    """Least frequently used over a sliding window of the last `window` tokens."""

    name = "window-lfu"

    def __init__(self, n_layers: int, n_expert: int, k: int, *, window: int = 60):
        self.k = k
        self.window = window
        self.chunks: deque[tuple[np.ndarray, int]] = deque()
        self.tokens = 0
        self.count = np.zeros((n_layers, n_expert), dtype=np.int64)

    def observe(self, delta: np.ndarray, n_tokens: int, last_used: np.ndarray | None = None) -> None:
        self.chunks.append((delta.copy(), n_tokens))
        self.count += delta
        self.tokens += n_tokens
        while self.chunks and self.tokens - self.chunks[0][1] >= self.window:
            old, n = self.chunks.popleft()
            self.count -= old
            self.tokens -= n

    def choose(self, resident: np.ndarray) -> np.ndarray:
        return swap_plan(self.count.astype(np.float64), resident, self.k)

    def hotness(self) -> np.ndarray:
        return self.count.astype(np.float64)


POLICIES = {cls.name: cls for cls in (DecayedFrequency, LRU, WindowLFU)}


def make_policy(name: str, n_layers: int, n_expert: int, k: int, rebalance_interval: int):
    """A policy by name with its default parameters; window-LFU's window is at least one rebalance
    interval (and at least 60 tokens, its best on the traces of benchmarks/RESULTS.md)."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {name!r}")
    if name == "decayed":
        return DecayedFrequency(n_layers, n_expert, k)
    if name == "window-lfu":
        return WindowLFU(n_layers, n_expert, k, window=max(rebalance_interval, 60))
    return LRU(n_layers, n_expert, k)


def replay(policy, trace: np.ndarray, interval: int, warmup: int | None = None, ahead: bool = False) -> dict:
    """Replay a routing trace through a policy the way HotCache drives it, without llama.

    trace: int [n_tokens, n_layers, n_expert], entries routed to each expert per token. The first
    `warmup` tokens (default: one interval) play the prompt: they fill the slots. After that the
    hot set is chosen every `interval` tokens and serves the tokens that follow; a slot serves its
    new expert from the next token on (host slots: copies finish before the next decode).
    ahead: after the prompt, each hot set serves from one token later (HotCache's plan_ahead: the
    plan is made while the next token decodes and its copies are issued after it; a prompt plans at
    once). Returns hits, misses, hit_rate and loads (experts copied into slots).
    """
    warmup = interval if warmup is None else warmup
    n_tokens, n_layers, n_expert = trace.shape
    resident = previous = np.zeros((n_layers, n_expert), dtype=bool)
    last_used = np.zeros((n_layers, n_expert), dtype=np.int64)
    hits = misses = loads = 0
    start = 0
    for end in [warmup, *range(warmup + interval, n_tokens + interval, interval)]:
        end = min(end, n_tokens)
        if end <= start:
            continue
        chunk = trace[start:end]
        if start > 0:  # the prompt's own tokens run before any slot is filled
            late = 1 if ahead and start > warmup else 0   # the token decoded while the plan was made
            for served, held in ((chunk[:late].sum(axis=0), previous), (chunk[late:].sum(axis=0), resident)):
                hits += int(served[held].sum())
                misses += int(served[~held].sum())
        for t in range(start, end):  # the shim's clock: 1-based token of each expert's latest routing
            last_used[trace[t] > 0] = t + 1
        policy.observe(chunk.sum(axis=0), end - start, last_used.copy())
        desired = policy.choose(resident)
        loads += int((desired & ~resident).sum())
        previous, resident = resident, desired
        start = end
    total = hits + misses
    return {"hits": hits, "misses": misses, "hit_rate": hits / total if total else 0.0, "loads": loads}
