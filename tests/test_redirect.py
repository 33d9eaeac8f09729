"""The hot-expert engine on CPU with host slots: bit-exact redirection, shadow checks, statistics.

The gate for every change to the redirect path: logits bit-identical to stock llama-cpp-python at
every step of a greedy generation spanning several rebalances, with the shim's outputs NaN-poisoned
before it writes them, for every fixture and every K; and a node-level shadow check.
"""
from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

import llamahot
from llamahot._shim import ffi, lib
from llamahot.model_info import read_moe_layout

from conftest import LLAMA_KW

PROMPT = b"def fibonacci(n):\n    if n < 2:\n        return n\n"
STEPS = 128
REBALANCE = 16

_stock_cache: dict[str, np.ndarray] = {}


def greedy(llm: llama_cpp.Llama, steps: int = STEPS, after_each=None) -> np.ndarray:
    """Logits of the prompt and of `steps` greedy single-token steps (llm built with logits_all)."""
    llm.reset()
    llm.eval(llm.tokenize(PROMPT))
    if after_each:
        after_each(llm)
    for _ in range(steps):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        if after_each:
            after_each(llm)
    return llm.scores[: llm.n_tokens].copy()


def stock_logits(path: str) -> np.ndarray:
    if path not in _stock_cache:
        stock = llama_cpp.Llama(path, logits_all=True, **LLAMA_KW)
        _stock_cache[path] = greedy(stock)
        stock.close()
        assert np.isfinite(_stock_cache[path]).all()
    return _stock_cache[path]


def assert_bit_identical(expected: np.ndarray, got: np.ndarray) -> None:
    assert expected.shape == got.shape
    differ = np.flatnonzero((expected.view(np.uint32) != got.view(np.uint32)).any(axis=1))
    assert differ.size == 0, f"logits differ at positions {differ[:10]} (of {len(expected)})"


def k_values(path: str) -> list[int]:
    layout = read_moe_layout(path)
    return sorted({1, layout.n_expert_used, layout.n_expert // 2, layout.n_expert})


def assert_shadow_rows_match(llm, steps: int = 8, **debug) -> dict:
    """Node level: `steps` greedy steps in shadow mode with poisoned outputs (llama computes every
    managed node, the shim recomputes it, every row is compared bitwise); returns the stats."""
    llm.hot_cache.set_debug(shadow=True, poison=True, **debug)
    greedy(llm, steps=steps)
    stats = llm.hot_cache.stats()
    assert stats["shadow_rows"] > 0 and stats["shadow_mismatches"] == 0
    return stats


def no_open_mutations(llm) -> None:
    assert llm.hot_cache.open_mutations() == 0, "a graph mutation outlived the decode"


@pytest.mark.parametrize("per_node", [False, True], ids=["layer-ffn", "per-node"])
def test_logits_bit_identical_with_host_slots(moe_model, per_node):
    """Both redirect paths: each layer's expert FFN in one stop (default), and one stop per
    expert matmul (the fallback for FFNs the shim does not recognise)."""
    expected = stock_logits(moe_model)
    layout = read_moe_layout(moe_model)
    for k in k_values(moe_model):
        llm = llamahot.Llama(moe_model, hot_experts=k, rebalance_interval=REBALANCE, slot_device="host",
                             logits_all=True, **LLAMA_KW)
        llm.hot_cache.set_debug(poison=True, per_node=per_node)
        got = greedy(llm, after_each=no_open_mutations)
        assert_bit_identical(expected, got)

        stats = llm.hot_cache.stats()
        n_prompt = len(llm.tokenize(PROMPT))
        assert stats["rebalances"] >= STEPS // REBALANCE, stats["rebalances"]
        # The prompt fills the slots; from then on every expert matmul of every decode step was
        # computed by the shim: one node per projection per MoE layer per step.
        assert stats["redirected_nodes"] == STEPS * layout.n_moe_layers * len(layout.projections)
        assert stats["ffn_redirects"] == (0 if per_node else STEPS * layout.n_moe_layers)
        # hits + misses are exactly the routed entries of the managed ubatches, layer by layer.
        counts = llm.hot_cache.routing_counts()
        np.testing.assert_array_equal(stats["hits_per_layer"] + stats["misses_per_layer"], counts.sum(axis=1))
        assert counts[0].sum() == (n_prompt + STEPS) * layout.n_expert_used
        assert stats["hits"] > 0
        assert stats["slots_occupied"] <= stats["slots_total"] == k * layout.n_moe_layers
        assert stats["bytes_moved"] == stats["experts_loaded"] * stats["slot_bytes"] // stats["slots_total"]
        llm.close()


def test_resident_layers_stay_with_llama_and_the_rest_stays_exact(moe_model):
    """resident_layers: the last MoE layers keep their experts where llama puts them and are never
    stopped; the others are managed as usual. Logits stay bit-identical."""
    expected = stock_logits(moe_model)
    layout = read_moe_layout(moe_model)
    resident = layout.n_moe_layers // 2
    k = layout.n_expert_used
    llm = llamahot.Llama(moe_model, hot_experts=k, resident_layers=resident, rebalance_interval=REBALANCE,
                         slot_device="host", logits_all=True, **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True)
    assert_bit_identical(expected, greedy(llm, after_each=no_open_mutations))
    stats = llm.hot_cache.stats()
    managed = layout.n_moe_layers - resident
    assert stats["n_moe_layers"] == managed and stats["resident_layers"] == resident
    assert stats["redirected_nodes"] == STEPS * managed * len(layout.projections)
    assert stats["slots_total"] == k * managed
    assert stats["hit_rate_all_layers"] == pytest.approx((stats["hit_rate"] * managed + resident) / layout.n_moe_layers)
    llm.close()


@pytest.mark.parametrize("resident", [-1, "all", True])
def test_bad_resident_layers_rejected(text_model, resident):
    n = read_moe_layout(text_model).n_moe_layers
    value = n if resident == "all" else resident
    with pytest.raises(ValueError, match="resident_layers"):
        llamahot.Llama(text_model, hot_experts=2, resident_layers=value, slot_device="host", **LLAMA_KW)


def test_hit_rate_is_one_once_all_experts_are_hot(text_model):
    layout = read_moe_layout(text_model)
    llm = llamahot.Llama(text_model, hot_experts=layout.n_expert, rebalance_interval=4, **LLAMA_KW)
    cache = llm.hot_cache
    llm.eval(llm.tokenize(PROMPT))
    # Decode until the policy has put every expert of every layer in a slot (only routed experts
    # are loaded), then count afresh.
    token = 0
    for _ in range(400):
        if cache.stats()["slots_occupied"] == cache.stats()["slots_total"]:
            break
        token = (token + 37) % llm.n_vocab()
        llm.eval([token])
    assert cache.stats()["slots_occupied"] == cache.stats()["slots_total"]
    cache.reset()
    for _ in range(16):
        token = (token + 37) % llm.n_vocab()
        llm.eval([token])
    stats = cache.stats()
    assert stats["misses"] == 0 and stats["hits"] == 16 * layout.n_expert_used * layout.n_moe_layers
    assert stats["hit_rate"] == 1.0
    assert sorted(np.unique(cache.hot_sets()).tolist()) == list(range(layout.n_expert))


def test_large_ubatches_are_left_to_llama_but_counted(text_model):
    layout = read_moe_layout(text_model)
    n_prompt = len(llama_cpp.Llama(text_model, vocab_only=True, verbose=False).tokenize(PROMPT))
    bypass = n_prompt - 1
    llm = llamahot.Llama(text_model, hot_experts=layout.n_expert_used, prefill_bypass=bypass, logits_all=True,
                         **LLAMA_KW)
    llm.eval(llm.tokenize(PROMPT))
    stats = llm.hot_cache.stats()
    assert stats["redirected_nodes"] == 0 and stats["hits"] + stats["misses"] == 0
    assert llm.hot_cache.routing_counts()[0].sum() == n_prompt * layout.n_expert_used
    for token in (5, 6, 7):
        llm.eval([token])
    stats = llm.hot_cache.stats()
    assert stats["redirected_nodes"] == 3 * layout.n_moe_layers * len(layout.projections)
    assert stats["hits"] + stats["misses"] == 3 * layout.n_expert_used * layout.n_moe_layers


@pytest.mark.parametrize("per_node", [False, True], ids=["layer-ffn", "per-node"])
@pytest.mark.parametrize("k_of", ["zero", "used", "all"])
def test_shadow_mode_recomputes_every_row_identically(moe_model, k_of, per_node):
    """llama computes each managed node; the shim recomputes it (per node, or the layer's whole
    FFN at its down node) from slots + weights into a NaN-filled buffer and compares every row."""
    layout = read_moe_layout(moe_model)
    k = {"zero": 0, "used": layout.n_expert_used, "all": layout.n_expert}[k_of]
    llm = llamahot.Llama(moe_model, hot_experts=k, rebalance_interval=8, logits_all=True, **LLAMA_KW)
    llm.hot_cache.set_debug(shadow=True, poison=True, per_node=per_node)
    greedy(llm, steps=32, after_each=no_open_mutations)
    stats = llm.hot_cache.stats()
    nodes_compared = len(layout.projections) if per_node else 1  # per layer and ubatch
    n_prompt = len(llm.tokenize(PROMPT))
    assert stats["shadow_rows"] == (n_prompt + 32) * layout.n_expert_used * layout.n_moe_layers * nodes_compared
    assert stats["shadow_mismatches"] == 0
    assert stats["redirected_nodes"] == 0, "shadow mode only compares; llama's results are kept"
    if k:
        assert stats["hits"] > 0


def _corrupt_every_slot(llm) -> None:
    """Test-only sabotage: overwrite the slot copies with other bytes."""
    cache = llm.hot_cache
    dst, nbytes = ffi.new("void **"), ffi.new("size_t *")
    from llamahot.hot_cache import PROJ_INDEX
    for layer in range(cache.layout.n_moe_layers):
        for slot in range(cache.hot_experts):
            for proj in cache.layout.projections:
                assert lib.lh_slot_slab(cache._ctx, layer, PROJ_INDEX[proj], slot, dst, nbytes) == 0
                ffi.memmove(dst[0], bytes(range(256)) * (nbytes[0] // 256) + bytes(nbytes[0] % 256), nbytes[0])


@pytest.mark.parametrize("per_node", [False, True], ids=["layer-ffn", "per-node"])
def test_checks_catch_a_wrong_slot(text_model, per_node):
    """The gates can fail: slots with wrong bytes show up in the shadow check and in the logits."""
    layout = read_moe_layout(text_model)
    llm = llamahot.Llama(text_model, hot_experts=layout.n_expert, rebalance_interval=10_000, logits_all=True,
                         **LLAMA_KW)
    llm.hot_cache.set_debug(shadow=True, per_node=per_node)
    llm.eval(llm.tokenize(PROMPT))  # fills the slots (first rebalance)
    _corrupt_every_slot(llm)
    llm.eval([5])
    assert llm.hot_cache.stats()["shadow_mismatches"] > 0

    llm.hot_cache.set_debug(poison=True, per_node=per_node)
    corrupted = greedy(llm, steps=4)
    assert (corrupted.view(np.uint32) != stock_logits(text_model)[: len(corrupted)].view(np.uint32)).any()


def test_two_instances_with_slots_stay_exact(all_moe_models):
    paths = [all_moe_models["qwen3moe-tiny"], all_moe_models["gptoss-tiny"]]
    llms = [llamahot.Llama(p, hot_experts=read_moe_layout(p).n_expert_used, rebalance_interval=8,
                           logits_all=True, **LLAMA_KW) for p in paths]
    for llm in llms:
        llm.hot_cache.set_debug(poison=True)
        llm.reset()
        llm.eval(llm.tokenize(PROMPT))
    for _ in range(STEPS // 2):  # interleaved: each instance's callback keeps to its own state
        for llm in llms:
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    for path, llm in zip(paths, llms):
        expected = stock_logits(path)[: llm.n_tokens]
        assert_bit_identical(expected, llm.scores[: llm.n_tokens])
        assert llm.hot_cache.stats()["redirected_nodes"] > 0
    assert llms[0].hot_cache.snapshot_name != llms[1].hot_cache.snapshot_name


@pytest.mark.parametrize("policy", ["decayed", "lru", "window-lfu"])
def test_every_policy_is_exact(text_model, policy):
    llm = llamahot.Llama(text_model, hot_experts=4, rebalance_interval=8, policy=policy, logits_all=True,
                         **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True)
    assert_bit_identical(stock_logits(text_model), greedy(llm))
    assert llm.hot_cache.stats()["policy"] == policy


def test_bad_policy_rejected(text_model):
    with pytest.raises(ValueError, match="policy must be one of"):
        llamahot.Llama(text_model, hot_experts=2, policy="mru", **LLAMA_KW)


def test_stats_shape_and_reset(text_model):
    layout = read_moe_layout(text_model)
    llm = llamahot.Llama(text_model, hot_experts=3, **LLAMA_KW)
    llm.create_completion("def add(a, b):", max_tokens=8, temperature=0.0)
    stats = llm.hot_cache.stats()
    for key in ("hits", "misses", "hit_rate", "hits_per_layer", "misses_per_layer", "slots_total",
                "slots_occupied", "bytes_moved", "rebalances", "decode_tok_s", "max_rebalance_ms", "rebalance_ms"):
        assert key in stats
    assert stats["rebalances"] > 0 and stats["max_rebalance_ms"] <= stats["rebalance_ms"]
    assert stats["bytes_moved"] == stats["experts_loaded"] * layout.expert_bytes
    assert stats["hits_per_layer"].shape == (layout.n_moe_layers,)
    assert stats["hits"] == stats["hits_per_layer"].sum()
    assert 0.0 <= stats["hit_rate"] <= 1.0 and stats["decode_tok_s"] > 0
    assert llm.hot_cache.hot_sets().shape == (layout.n_moe_layers, 3)
    llm.hot_cache.reset()
    stats = llm.hot_cache.stats()
    assert stats["hits"] == stats["misses"] == stats["bytes_moved"] == stats["tokens"] == stats["rebalance_ms"] == 0
    assert stats["slots_occupied"] > 0, "reset keeps the hot sets"


def test_application_callback_with_slots_stays_exact(text_model):
    """With an application's eval callback chained, the shim redirects per node (the callback may
    stop the graph anywhere) and the application still sees every node it asks for."""
    from ggml_nodes import NodeRecorder

    layout = read_moe_layout(text_model)
    recorder = NodeRecorder(("ffn_moe_topk",))
    llm = llamahot.Llama(text_model, hot_experts=layout.n_expert_used, rebalance_interval=8, logits_all=True,
                         cb_eval=recorder.callback, **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True)
    got = greedy(llm, steps=8)
    assert_bit_identical(stock_logits(text_model)[: len(got)], got)
    stats = llm.hot_cache.stats()
    assert stats["redirected_nodes"] > 0 and stats["ffn_redirects"] == 0
    assert sorted(recorder.stacked("ffn_moe_topk")) == list(layout.moe_blocks)


@pytest.mark.parametrize("per_node", [False, True], ids=["layer-ffn", "per-node"])
def test_aborted_decode_leaves_no_skipped_node(text_model, per_node):
    """A decode aborted mid-graph (llama_set_abort_callback) returns before the shim's answer for
    the node it skipped; llamahot restores the graph after the failed eval, and later evals stay
    exact (llama.cpp reuses the graph)."""
    layout = read_moe_layout(text_model)
    llm = llamahot.Llama(text_model, hot_experts=layout.n_expert, rebalance_interval=8, logits_all=True,
                         **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True, per_node=per_node)
    greedy(llm, steps=4)
    calls = {"n": 0}

    @llama_cpp.ggml_abort_callback
    def abort_soon(_data):
        calls["n"] += 1
        return calls["n"] > 3  # a few nodes into the graph, past at least one skipped node

    llama_cpp.llama_set_abort_callback(llm.ctx, abort_soon, None)
    with pytest.raises(Exception):
        llm.eval([7])
    assert llm.hot_cache.open_mutations() == 0
    llama_cpp.llama_set_abort_callback(llm.ctx, llama_cpp.ggml_abort_callback(), None)  # NULL: none
    got = greedy(llm)
    assert_bit_identical(stock_logits(text_model), got)


def test_changing_hot_experts_at_runtime_stays_exact(moe_model):
    """set_hot_experts(K) frees and re-creates the slots without reloading; logits stay bit-exact."""
    layout = read_moe_layout(moe_model)
    llm = llamahot.Llama(moe_model, hot_experts=1, rebalance_interval=8, logits_all=True, **LLAMA_KW)
    cache = llm.hot_cache
    cache.set_debug(poison=True)
    llm.reset()
    llm.eval(llm.tokenize(PROMPT))
    schedule = {20: layout.n_expert, 50: 0, 70: layout.n_expert_used, 100: layout.n_expert // 2}
    for step in range(STEPS):
        if step in schedule:
            cache.set_hot_experts(schedule[step])
            assert cache.stats()["slots_total"] == schedule[step] * layout.n_moe_layers
            assert cache.hot_sets().shape == (layout.n_moe_layers, schedule[step])
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        no_open_mutations(llm)
    assert_bit_identical(stock_logits(moe_model), llm.scores[: llm.n_tokens])
    stats = cache.stats()
    assert stats["slots_occupied"] > 0 and stats["hits"] > 0
    with pytest.raises(ValueError, match="hot_experts must be an integer"):
        cache.set_hot_experts(layout.n_expert + 1)


def test_cpu_graph_counters_and_threads(text_model):
    """cpu_runs / cpu_rows count the stops' CPU graphs and their rows; set_threads keeps them exact."""
    llm = llamahot.Llama(text_model, hot_experts=3, rebalance_interval=REBALANCE, slot_device="host",
                         logits_all=True, **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True)
    llm.hot_cache.set_threads(1)
    assert_bit_identical(stock_logits(text_model), greedy(llm))
    stats = llm.hot_cache.stats()
    # Host slots: every stop runs a CPU graph over all of its layer's routed rows, hot and cold
    # (the prompt ran before the slots existed: llama computed it).
    layout = read_moe_layout(text_model)
    assert stats["cpu_runs"] == stats["ffn_redirects"] == STEPS * layout.n_moe_layers
    assert stats["cpu_rows"] == STEPS * layout.n_moe_layers * layout.n_expert_used
    by_rows = stats["cpu_runs_by_rows"]
    assert by_rows[min(layout.n_expert_used, 8)] == stats["cpu_runs"] and sum(by_rows) == stats["cpu_runs"]
    assert 0 < stats["cpu_ms_by_rows"][min(layout.n_expert_used, 8)] <= stats["cpu_compute_ms"]
    with pytest.raises(ValueError, match="n_threads must be"):
        llm.hot_cache.set_threads(0)
    llm.close()

