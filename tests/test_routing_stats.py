"""Routing statistics and the offline optimum, on traces whose answers are known."""
from __future__ import annotations

import numpy as np

from llamahot.policy import make_policy, replay
from llamahot.routing_stats import belady, experts_covering, report, reuse


def trace_from_sets(sets: list[list[int]], n_expert: int) -> np.ndarray:
    trace = np.zeros((len(sets), 1, n_expert), dtype=np.int64)
    for t, chosen in enumerate(sets):
        trace[t, 0, chosen] = 1
    return trace


def test_reuse_counts_repeats_from_recent_tokens():
    trace = trace_from_sets([[0, 1], [1, 2], [2, 3], [0, 3]], n_expert=4)
    assert reuse(trace, 1)[0] == (1 + 1 + 1) / 6         # {1}, {2}, {3} repeat from the token before
    assert reuse(trace, 8)[0] == (1 + 1 + 2) / 6         # the last token's 0 came 3 tokens back


def test_experts_covering_a_share_of_the_routing():
    trace = np.array([[[50, 30, 10, 10]]])
    assert experts_covering(trace, 0.5)[0] == 0.25   # expert 0 alone takes half
    assert experts_covering(trace, 0.9)[0] == 0.75   # 50 + 30 + 10


def test_belady_is_an_upper_bound_for_every_policy():
    rng = np.random.default_rng(0)
    sets = [rng.choice(16, 2, replace=False, p=np.r_[np.full(4, 0.15), np.full(12, 0.4 / 12)]).tolist()
            for _ in range(400)]
    trace = trace_from_sets(sets, 16)
    for k in (2, 4, 8):
        best = belady(trace, k)
        assert best["hits"] + best["misses"] == trace.sum()
        for name in ("decayed", "lru", "window-lfu"):
            # replay() skips the warm-up tokens' hits; compare on the same tokens.
            got = replay(make_policy(name, 1, 16, k, 10), trace, 10, warmup=1)
            assert got["hits"] <= best["hits"], (name, k, got, best)
    assert belady(trace, 16)["misses"] == (trace.sum(axis=0) > 0).sum()  # only first sightings miss
    assert belady(trace, 0)["hits"] == 0


def test_report_has_the_published_statistics():
    rng = np.random.default_rng(1)
    trace = np.zeros((200, 3, 32), dtype=np.int64)
    for t in range(200):
        for layer in range(3):
            trace[t, layer, rng.choice(32, 4, replace=False)] = 1
    out = report(trace)
    assert set(out["mean"]) == {"experts_for_50pct", "experts_for_90pct", "next_token_reuse", "reuse_within_8"}
    # Uniform random routing: reuse ~ 4/32 from the token before, more within 8; no skew.
    assert 0.05 < out["mean"]["next_token_reuse"] < 0.25 < out["mean"]["reuse_within_8"]
    assert out["mean"]["experts_for_90pct"] > 0.8
