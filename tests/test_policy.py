"""Policies on routing traces: plain numpy, no llama. Traces are recorded from a fixture model
(the shim's routing counts after each decode step) or built with a known shift in routing."""
from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

import llamahot
from llamahot.policy import LRU, POLICIES, DecayedFrequency, WindowLFU, make_policy, replay, swap_plan

from conftest import LLAMA_KW


def shifting_trace(n_tokens=600, n_layers=3, n_expert=32, n_used=2, shift_at=300, seed=0) -> np.ndarray:
    """80 % of routing goes to experts 0..7 before `shift_at` and to 8..15 after; the rest uniform."""
    rng = np.random.default_rng(seed)
    trace = np.zeros((n_tokens, n_layers, n_expert), dtype=np.int64)
    for t in range(n_tokens):
        favourites = np.arange(8) if t < shift_at else np.arange(8, 16)
        for layer in range(n_layers):
            pool = favourites if rng.random() < 0.8 else np.arange(n_expert)
            trace[t, layer, rng.choice(pool, n_used, replace=False)] += 1
    return trace


@pytest.fixture(scope="module")
def recorded_trace(text_model) -> np.ndarray:
    """Per-token routing of a greedy decode on a fixture, as the shim counted it."""
    llm = llamahot.Llama(text_model, hot_experts=0, **LLAMA_KW)
    llm.eval(llm.tokenize(b"def fibonacci(n):\n"))
    rows, before = [], llm.hot_cache.routing_counts()
    token = 0
    for _ in range(240):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        llm.eval([token])
        after = llm.hot_cache.routing_counts()
        rows.append(after - before)
        before = after
    trace = np.stack(rows)
    assert (trace.sum(axis=2)[:, 0] == llm.hot_cache.layout.n_expert_used).all()
    return trace


def test_swap_plan_fills_then_swaps_only_past_the_margin():
    score = np.array([[5.0, 4.0, 3.0, 0.0, 1.0]])
    empty = np.zeros_like(score, dtype=bool)
    np.testing.assert_array_equal(swap_plan(score, empty, 2), [[True, True, False, False, False]])
    # Never-routed experts (score 0) are not loaded even with room to spare.
    np.testing.assert_array_equal(swap_plan(score, empty, 5), [[True, True, True, False, True]])
    resident = np.array([[False, True, True, False, False]])  # holds 4.0 and 3.0
    # 5.0 vs weakest resident 3.0: beats it by 67 % -> swapped at margin 0.5, kept at margin 1.0.
    np.testing.assert_array_equal(swap_plan(score, resident, 2, 0.5), [[True, True, False, False, False]])
    np.testing.assert_array_equal(swap_plan(score, resident, 2, 1.0), resident)
    assert not swap_plan(score, resident, 0).any()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_keep_at_most_k_and_follow_a_shift(name):
    trace = shifting_trace()
    k, interval = 8, 30
    policy = make_policy(name, trace.shape[1], trace.shape[2], k, interval)
    resident = np.zeros(trace.shape[1:], dtype=bool)
    for start in range(0, len(trace), interval):
        policy.observe(trace[start:start + interval].sum(axis=0), interval)
        resident = policy.choose(resident)
        assert (resident.sum(axis=1) <= k).all()
    # Well after the shift, most favourites of the second phase are hot.
    assert resident[:, 8:16].sum(axis=1).min() >= 5, resident[:, 8:16].sum(axis=1)
    result = replay(make_policy(name, trace.shape[1], trace.shape[2], k, interval), trace, interval)
    uniform = k / trace.shape[2]
    assert result["hit_rate"] > 2 * uniform, result


def test_decayed_frequency_holds_the_top_k_of_decayed_counts(recorded_trace):
    n_layers, n_expert = recorded_trace.shape[1:]
    k, interval = 8, 16
    policy = DecayedFrequency(n_layers, n_expert, k, half_life=interval, margin=0.25)
    resident = np.zeros((n_layers, n_expert), dtype=bool)
    score = np.zeros((n_layers, n_expert))
    for start in range(0, len(recorded_trace), interval):
        chunk = recorded_trace[start:start + interval]
        policy.observe(chunk.sum(axis=0), len(chunk))
        score = score * 0.5 ** (len(chunk) / interval) + chunk.sum(axis=0)
        resident = policy.choose(resident)
        np.testing.assert_allclose(policy.hotness(), score)
        for layer in range(n_layers):
            held, out = score[layer][resident[layer]], score[layer][~resident[layer]]
            # Hysteresis invariant: no outsider beats the weakest resident by more than the margin,
            # and slots are full whenever enough experts were routed to.
            if held.size and out.size:
                assert out.max() <= held.min() * 1.25 + 1e-9
            assert held.size == min(k, int((score[layer] > 0).sum()))


def test_hysteresis_damps_thrashing_on_near_ties():
    # Two experts routed to equally often (coin flips), so each is ahead half of the time; k = 1.
    rng = np.random.default_rng(1)
    trace = np.zeros((2000, 1, 4), dtype=np.int64)
    trace[np.arange(2000), 0, rng.integers(0, 2, 2000)] = 1
    loads = {margin: replay(DecayedFrequency(1, 4, 1, half_life=20, margin=margin), trace, 10)["loads"]
             for margin in (0.0, 0.5)}
    assert loads[0.5] * 3 < loads[0.0], loads


def test_lru_keeps_the_most_recent(recorded_trace):
    n_layers, n_expert = recorded_trace.shape[1:]
    policy = LRU(n_layers, n_expert, 4)
    for t in range(len(recorded_trace)):
        policy.observe(recorded_trace[t], 1)
    resident = policy.choose(np.zeros((n_layers, n_expert), dtype=bool))
    last = recorded_trace[-1] > 0  # the last token's experts are the most recent of all
    assert (resident[last]).all()


def test_window_lfu_counts_exactly_the_window(recorded_trace):
    n_layers, n_expert = recorded_trace.shape[1:]
    policy = WindowLFU(n_layers, n_expert, 4, window=32)
    for t in range(len(recorded_trace)):
        policy.observe(recorded_trace[t], 1)
    np.testing.assert_array_equal(policy.hotness(), recorded_trace[-32:].sum(axis=0))


def test_replay_on_recorded_trace_beats_chance_with_more_slots(recorded_trace):
    n_layers, n_expert = recorded_trace.shape[1:]
    rates = [replay(make_policy("decayed", n_layers, n_expert, k, 16), recorded_trace, 16)["hit_rate"]
             for k in (4, 16, n_expert)]
    assert rates[0] <= rates[1] <= rates[2]
    assert rates[2] > 0.9  # all experts fit: only the first sighting of each is a miss


def test_lru_uses_per_token_recency_when_given():
    policy = LRU(1, 6, 2)
    delta = np.array([[3, 3, 3, 3, 0, 0]])
    last_used = np.array([[10, 40, 20, 30, 0, 0]])  # all routed in this interval, at different tokens
    policy.observe(delta, 40, last_used)
    np.testing.assert_array_equal(policy.choose(np.zeros((1, 6), dtype=bool)), [[False, True, False, True, False, False]])


def test_shim_records_the_token_of_each_experts_last_routing(text_model):
    llm = llamahot.Llama(text_model, hot_experts=2, **LLAMA_KW)
    prompt = llm.tokenize(b"def f(x):\n")
    llm.eval(prompt)
    before = llm.hot_cache.routing_counts()
    llm.eval([42])
    routed_now = (llm.hot_cache.routing_counts() - before)[0] > 0
    last = llm.hot_cache._last_routed.copy()
    n = len(prompt) + 1
    assert last.max() == n
    assert (last[0][routed_now] == n).all() and (last[0][~routed_now] < n).all()


def _swap_plan_by_layer(score, resident, k, margin):
    """The rule of swap_plan written as a plain loop over layers (its first version)."""
    desired = resident.copy()
    if k == 0:
        desired[:] = False
        return desired
    for layer in range(score.shape[0]):
        s, res = score[layer], desired[layer]
        newcomers = np.flatnonzero(~res & (s > 0))
        newcomers = newcomers[np.argsort(-s[newcomers], kind="stable")]
        free = k - int(res.sum())
        if free > 0:
            res[newcomers[:free]] = True
            newcomers = newcomers[free:]
        residents = np.flatnonzero(res)
        residents = residents[np.argsort(s[residents], kind="stable")]
        for new, old in zip(newcomers, residents):
            if not s[new] > s[old] * (1.0 + margin) + 1e-12:
                break
            res[new], res[old] = True, False
    return desired


def test_vectorised_swap_plan_matches_the_loop_over_layers():
    rng = np.random.default_rng(7)
    for _ in range(3000):
        n_layers, n_expert = int(rng.integers(1, 6)), int(rng.integers(1, 40))
        k = int(rng.integers(0, n_expert + 1))
        if rng.random() < 0.5:  # integer counts: many ties
            score = rng.integers(0, 5, (n_layers, n_expert)) * rng.choice([1.0, 0.5, 1.3], (n_layers, n_expert))
        else:
            score = rng.random((n_layers, n_expert)) * (rng.random((n_layers, n_expert)) < 0.6)
        resident = np.zeros((n_layers, n_expert), dtype=bool)
        for layer in range(n_layers):  # sometimes more residents than k (after a resize)
            n = int(rng.integers(0, min(k + 2, n_expert) + 1))
            resident[layer, rng.choice(n_expert, n, replace=False)] = True
        margin = float(rng.choice([0.0, 0.25, 1.0]))
        assert np.array_equal(swap_plan(score, resident, k, margin),
                              _swap_plan_by_layer(score, resident, k, margin))
