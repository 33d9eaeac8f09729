"""Which experts are hot: policies in plain numpy, no llama imports (testable on recorded traces).

A policy sees routing as count deltas, `observe(delta, n_tokens, last_used)` with delta int64
[n_layers, n_expert] = entries routed to each expert since the last call and last_used int64
[n_layers, n_expert] = the token (1-based clock, 0 = never) of each expert's latest routing, and answers
`choose(resident)`: the desired hot set, a bool [n_layers, n_expert] mask with at most k experts
per layer, given the resident mask. The slot manager turns the difference into copies.
`set_prior(rates)` gives a policy the long-run routing of a profile (llamahot.profile): float
[n_layers, n_expert], expected routings per token, which it keeps beside what it observes.
"""
from __future__ import annotations

from collections import deque

import numpy as np


def swap_plan(score: np.ndarray, resident: np.ndarray, k: int, margin: float = 0.0) -> np.ndarray:
    """Desired hot mask from per-expert scores, changing as little as needed.

    Empty slots are filled with the best-scoring non-residents that were routed to at all
    (score > 0). A resident is replaced only by a newcomer whose score beats it by `margin`
    (relative): the best newcomer against the weakest resident, the second against the second
    weakest, and so on. Ties rank by expert index. Layers are independent.

    Only the few experts that can change are sorted, all layers in one flat list: the newcomers
    that fill an empty slot or beat their layer's weakest resident (usually 0-2 per layer at a
    rebalance), and the hot experts that the best remaining newcomer beats: ~0.09 ms for 48 layers x
    128 experts at K=51, against ~0.27 ms sorting every layer that changes (benchmarks/
    rebalance_cost.py). Masks are read through arithmetic and flat indices: np.where and np.nonzero
    on a mask without pattern cost 2-5x more.
    """
    if k == 0:
        return np.zeros_like(resident)
    n_layers, n_expert = score.shape
    n_resident = resident.sum(axis=1)
    to_beat = score * (1.0 + margin) + 1e-12   # what a newcomer must score to replace the expert
    # Each layer's weakest resident's to_beat (the same as computing it from the weakest's score).
    weakest = (to_beat + _INF_WHERE_FALSE.take(resident.view(np.uint8))).min(axis=1)
    # Newcomers (not resident, score > 0) that may come in: all where a slot is empty, else those
    # that beat the weakest resident. Per layer, best first (ties by index).
    bar = np.where(n_resident < k, 0.0, np.maximum(weakest, 0.0))
    new = np.flatnonzero((score > bar[:, None]) & ~resident)
    if new.size == 0:
        return resident.copy()
    new, layer, value, rank = _by_layer(new, -score.take(new), n_expert)
    value = -value
    filled = np.maximum(k - n_resident, 0)[layer]   # a layer's first `filled` take its empty slots
    pair = rank - filled                            # the others challenge the hot experts, in pairs
    desired = resident.copy()
    desired.flat[new[pair < 0]] = True
    # The hot experts that the best remaining newcomer beats: the first of the hot ones weakest
    # first (ties by index); no other can lose its pair.
    best = np.full(n_layers, -np.inf)
    best[layer[pair == 0]] = value[pair == 0]
    old = np.flatnonzero(desired & (to_beat < best[:, None]))
    old, old_layer, _, old_rank = _by_layer(old, score.take(old), n_expert)
    # The j-th remaining newcomer against the j-th weakest, up to the first pair it does not win.
    n_swaps = np.zeros(n_layers, dtype=np.int64)
    n_pairs = int(pair.max()) + 1
    if n_pairs > 0 and old.size:
        challenger = np.full((n_layers, n_pairs), -np.inf)
        remaining = pair >= 0
        challenger[layer[remaining], pair[remaining]] = value[remaining]
        defender = np.full((n_layers, n_pairs), np.inf)
        near = old_rank < n_pairs
        defender[old_layer[near], old_rank[near]] = to_beat.take(old[near])
        n_swaps = np.logical_and.accumulate(challenger > defender, axis=1).sum(axis=1)
    desired.flat[new[pair < n_swaps[layer]]] = True   # (the fill's again, and the winners)
    desired.flat[old[old_rank < n_swaps[old_layer]]] = False
    return desired


# Indexed by a bool mask viewed as uint8: +inf where False, 0 where True (added to scores, a
# branch-free np.where).
_INF_WHERE_FALSE = np.array([np.inf, 0.0])


def _by_layer(flat: np.ndarray, key: np.ndarray, n_expert: int):
    """Flat indices (layer * n_expert + expert, ascending) sorted by layer, then key, ties by
    index: (flat, layer, key, rank), rank = position within the layer."""
    layer = flat // n_expert
    order = np.lexsort((key, layer))   # stable
    flat, layer, key = flat[order], layer[order], key[order]
    return flat, layer, key, rank_in_layer(layer)


def rank_in_layer(layer: np.ndarray) -> np.ndarray:
    """Position of each entry among those of its layer (`layer` ascending)."""
    return np.arange(len(layer)) - np.searchsorted(layer, layer)


# A routing profile counts as a steady routing at half its rate beside the observed one. On the
# calibrated trace (the first half as the profile, replayed on the second) it lifts the sticky in-place
# policy's hit rate at K=51 from 0.817 to 0.843 (the profile's static hot set) and leaves the slots'
# policy's at 0.873 with a third fewer loads; weight 1 or 2 gave the same in place and less with slots
# (benchmarks/RESULTS.md, session 19).
PRIOR_WEIGHT = 0.5


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
        self.prior = np.zeros((n_layers, n_expert), dtype=np.float64)

    def set_prior(self, rates: np.ndarray) -> None:
        # The score a steady routing at these rates settles to, at PRIOR_WEIGHT; it does not decay.
        self.prior = PRIOR_WEIGHT * np.asarray(rates, dtype=np.float64) / (1.0 - self.decay_per_token)

    def observe(self, delta: np.ndarray, n_tokens: int, last_used: np.ndarray | None = None) -> None:
        self.score *= self.decay_per_token ** n_tokens
        self.score += delta

    def choose(self, resident: np.ndarray) -> np.ndarray:
        return swap_plan(self.hotness(), resident, self.k, self.margin)

    def hotness(self) -> np.ndarray:
        return self.score + self.prior


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
        self.prior = np.zeros((n_layers, n_expert), dtype=np.float64)

    def set_prior(self, rates: np.ndarray) -> None:
        # Recency decides; a profile only orders the experts that tie on it (at start: all of them).
        rates = np.asarray(rates, dtype=np.float64)
        self.prior = rates / (rates.max() + 1.0)

    def observe(self, delta: np.ndarray, n_tokens: int, last_used: np.ndarray | None = None) -> None:
        self.clock += n_tokens
        if last_used is not None:
            self.last_used = np.array(last_used, dtype=np.int64)
        else:  # no per-token clock: everything routed in this chunk counts as just used
            self.last_used[delta > 0] = self.clock
        self.last_count = np.array(delta)

    def choose(self, resident: np.ndarray) -> np.ndarray:
        return swap_plan(self.hotness(), resident, self.k)

    def hotness(self) -> np.ndarray:
        # Ties on the token of last use are broken by the count in the last interval, then the prior.
        return self.last_used + (self.last_count + self.prior) / (self.last_count.max() + 2.0)


class WindowLFU:
    """Least frequently used over a sliding window of the last `window` tokens."""

    name = "window-lfu"

    def __init__(self, n_layers: int, n_expert: int, k: int, *, window: int = 60):
        self.k = k
        self.window = window
        self.chunks: deque[tuple[np.ndarray, int]] = deque()
        self.tokens = 0
        self.count = np.zeros((n_layers, n_expert), dtype=np.int64)
        self.prior = np.zeros((n_layers, n_expert), dtype=np.float64)

    def set_prior(self, rates: np.ndarray) -> None:
        self.prior = PRIOR_WEIGHT * self.window * np.asarray(rates, dtype=np.float64)

    def observe(self, delta: np.ndarray, n_tokens: int, last_used: np.ndarray | None = None) -> None:
        self.chunks.append((delta.copy(), n_tokens))
        self.count += delta
        self.tokens += n_tokens
        while self.chunks and self.tokens - self.chunks[0][1] >= self.window:
            old, n = self.chunks.popleft()
            self.count -= old
            self.tokens -= n

    def choose(self, resident: np.ndarray) -> np.ndarray:
        return swap_plan(self.hotness(), resident, self.k)

    def hotness(self) -> np.ndarray:
        return self.count + self.prior


POLICIES = {cls.name: cls for cls in (DecayedFrequency, LRU, WindowLFU)}


# Rebalance intervals by default, and the decayed policy's parameters with the experts in place
# (gpu_mode="managed"), where moving an expert's pages costs the decode 0.1-0.5 ms (session 20's probe;
# session 18 had inferred ~1 ms a load) against ~0.05 ms for a slot copy: there a sticky policy that moves
# almost no experts once settled wins (benchmarks/RESULTS.md, session 18: 94.7 tok/s against 83.3 for every
# 16 / half-life 512 / margin 2 and 73.8 for the slots' every 4 / 128 / 0.25, at K=51 on the H100; session
# 20's cost-model replay puts the best adaptive setting 3-7 % ahead at most).
REBALANCE_INTERVAL = 4
IN_PLACE_REBALANCE_INTERVAL = 64
IN_PLACE_DECAYED = dict(half_life=2048.0, margin=3.0)
# In place, reading a decode step's routing stops llama.cpp's graph at every MoE layer (1.3 ms a token on
# the H100 at K=128, session 21). Once the policy knows this many tokens of routing in the first MoE layer (a
# routing profile's, or observed), only one step in IN_PLACE_OBSERVE_EVERY is read: with a profile, one in 16
# gave 86.4 tok/s against 78.7 for every step at the same hit rate (0.803 / 0.796); before that, every step
# (one in 4 without a profile lost more in hit rate than it saved, session 18). Unread steps run without the
# eval callback (session 22), so a read costs what it stops plus a re-capture of llama.cpp's CUDA graph on
# the steps after it: reads come IN_PLACE_OBSERVE_BURST in a row (K=128: 214.5 tok/s against 201.9 one at a
# time and 217.2 never reading; K=51: 117.1 against 111.0, the same hit rate). benchmarks/RESULTS.md,
# sessions 19, 21 and 22.
IN_PLACE_LEARN_TOKENS = 4096
IN_PLACE_OBSERVE_EVERY = 16
IN_PLACE_OBSERVE_BURST = 8


def make_policy(name: str, n_layers: int, n_expert: int, k: int, rebalance_interval: int, in_place: bool = False):
    """A policy by name with its default parameters (the decayed one's stickier with the experts in
    place); window-LFU's window is at least one rebalance interval (and at least 60 tokens, its best on
    the traces of benchmarks/RESULTS.md)."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {name!r}")
    if name == "decayed":
        return DecayedFrequency(n_layers, n_expert, k, **(IN_PLACE_DECAYED if in_place else {}))
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
