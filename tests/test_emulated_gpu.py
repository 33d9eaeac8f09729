"""The GPU code path of the shim, run in CI: slot_device="emulated-gpu" puts a second CPU backend in
the GPU's place. Slots live in that backend's buffers in the standard layout (experts loaded without
CPU repacking), hot rows go through the device branch (inputs staged and uploaded asynchronously,
a device graph per layer, GPU copies of expert biases, results downloaded), cold rows through the
CPU. Only the CUDA kernels and the cuda-python copies are left for the GPU machine (test_gpu.py).

Reference: the same placement with K = 0 (llama computes every expert matmul itself, no repacking).
"""
from __future__ import annotations

import numpy as np
import pytest

import llamahot
from llamahot.hot_cache import _check_cold_on_device
from llamahot.model_info import read_moe_layout

from conftest import LLAMA_KW, assert_one_input_copy_per_persistent_run
from test_redirect import PROMPT, assert_bit_identical, assert_shadow_rows_match, greedy, no_open_mutations

STEPS = 64
_reference: dict[str, np.ndarray] = {}


def reference_logits(path: str) -> np.ndarray:
    if path not in _reference:
        llm = llamahot.Llama(path, hot_experts=0, slot_device="emulated-gpu", logits_all=True, **LLAMA_KW)
        _reference[path] = greedy(llm, steps=STEPS)
        llm.close()
    return _reference[path]


@pytest.mark.parametrize("per_node", [False, True], ids=["layer-ffn", "per-node"])
def test_device_path_bit_identical(moe_model, per_node):
    layout = read_moe_layout(moe_model)
    expected = reference_logits(moe_model)
    for k in sorted({1, layout.n_expert_used, layout.n_expert}):
        llm = llamahot.Llama(moe_model, hot_experts=k, rebalance_interval=8, slot_device="emulated-gpu",
                             logits_all=True, **LLAMA_KW)
        llm.hot_cache.set_debug(poison=True, per_node=per_node)
        # Slots fill asynchronously (published once their copies finished, as with CUDA): a layer
        # whose slots are all empty or in flight at a step leaves its matmuls to llama.
        layers_with_slots = []

        def after_each(llm):
            no_open_mutations(llm)
            layers_with_slots.append(int((llm.hot_cache.hot_sets() >= 0).any(axis=1).sum()))

        assert_bit_identical(expected, greedy(llm, steps=STEPS, after_each=after_each))
        stats = llm.hot_cache.stats()
        assert stats["hits"] > 0 and stats["gpu_submit_ms"] > 0, "hot rows went through the device branch"
        assert stats["experts_loaded"] > 0 and stats["slots_loading"] <= stats["slots_total"]
        assert stats["redirected_nodes"] == sum(layers_with_slots[:STEPS]) * len(layout.projections)
        assert stats["ffn_redirects"] == (0 if per_node else sum(layers_with_slots[:STEPS]))
        # Single-token decode, whole-FFN mode, K >= n_expert_used (a slot for the padding rows is
        # then always free): every stop with hot rows ran the layer's persistent graph (fixed
        # n_expert_used rows; see lh_hot_graph); only the prompt's ubatch (at most one stop per
        # layer) went through a graph built for the call.
        if per_node:
            assert stats["persistent_gpu_runs"] == stats["persistent_cpu_runs"] == 0
        elif k >= layout.n_expert_used:
            assert 0 < stats["persistent_gpu_runs"] and \
                stats["gpu_runs"] - stats["persistent_gpu_runs"] <= layout.n_moe_layers
        # ... and every single-token stop with cold rows replayed the layer's persistent cold graph for
        # that many rows; only the prompt's CPU graphs were built for the call.
        if not per_node and k < layout.n_expert:
            assert 0 < stats["persistent_cpu_runs"] and stats["cpu_runs"] - stats["persistent_cpu_runs"] <= layout.n_moe_layers
        assert_one_input_copy_per_persistent_run(stats)
        llm.close()


def test_call_graphs_debug_mode_builds_the_hot_graph_per_call(text_model):
    """The benchmarks' comparison modes: the same exact logits without the persistent graphs, hot
    (call_graphs) or cold (call_cold_graphs)."""
    layout = read_moe_layout(text_model)
    llm = llamahot.Llama(text_model, hot_experts=layout.n_expert, slot_device="emulated-gpu", logits_all=True,
                         **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True, call_graphs=True)
    assert_bit_identical(reference_logits(text_model)[: len(llm.tokenize(PROMPT)) + 16], greedy(llm, steps=16))
    stats = llm.hot_cache.stats()
    assert stats["gpu_runs"] > 0 and stats["persistent_gpu_runs"] == 0
    llm.close()
    llm = llamahot.Llama(text_model, hot_experts=max(1, layout.n_expert // 4), slot_device="emulated-gpu",
                         logits_all=True, **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True, call_cold_graphs=True)
    assert_bit_identical(reference_logits(text_model)[: len(llm.tokenize(PROMPT)) + 16], greedy(llm, steps=16))
    stats = llm.hot_cache.stats()
    assert stats["cpu_runs"] > 0 and stats["persistent_cpu_runs"] == 0
    llm.close()


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_cold_experts_on_the_device_stay_exact(moe_model, share):
    """cold_on_device: a share of each stop's cold experts is copied into device scratch matrices
    and computed there while the CPU computes the others; logits stay bit-identical."""
    layout = read_moe_layout(moe_model)
    k = max(1, layout.n_expert // 4)
    llm = llamahot.Llama(moe_model, hot_experts=k, rebalance_interval=8, slot_device="emulated-gpu",
                         cold_on_device=share, logits_all=True, **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True)
    layers_without_slots = []  # a layer with no slot published at a step does not stop at all

    def after_each(llm):
        no_open_mutations(llm)
        layers_without_slots.append(int((llm.hot_cache.hot_sets() < 0).all(axis=1).sum()))

    assert_bit_identical(reference_logits(moe_model), greedy(llm, steps=STEPS, after_each=after_each))
    stats = llm.hot_cache.stats()
    assert stats["misses"] > 0 and stats["device_cold_rows"] > 0, "cold rows went through the device"
    # ... in the layers' persistent device graphs (one per stop that sent rows), never built per stop
    assert 0 < stats["persistent_dev_runs"] <= stats["device_cold_rows"]
    if share == 1.0:  # every cold row of the single-token stops (the prompt's stay on the CPU)
        left_to_llama = len(llm.tokenize(PROMPT)) * layout.n_moe_layers + sum(layers_without_slots[:STEPS])
        assert stats["device_cold_rows"] >= stats["misses"] - left_to_llama * layout.n_expert_used
    assert_shadow_rows_match(llm)   # node level: every row against llama's own
    llm.close()


def test_cold_on_device_rejects_bad_values(text_model):
    with pytest.raises(ValueError, match="0..1"):
        llamahot.Llama(text_model, hot_experts=1, slot_device="emulated-gpu", cold_on_device=1.5, **LLAMA_KW)
    with pytest.raises(ValueError, match="needs slots on a GPU"):
        llamahot.Llama(text_model, hot_experts=1, slot_device="host", cold_on_device=0.5, **LLAMA_KW)
    llm = llamahot.Llama(text_model, hot_experts=1, slot_device="emulated-gpu", **LLAMA_KW)
    with pytest.raises(ValueError, match="0..1"):
        llm.hot_cache.set_cold_on_device(-0.1)
    assert llm.hot_cache.stats()["cold_on_device"] == 0.0   # the default off CUDA slots
    llm.hot_cache.set_cold_on_device(0.5)
    assert llm.hot_cache.stats()["cold_on_device"] == 0.5
    llm.close()
    # The default: 0.34 with CUDA slots redirected (one row of a stop with 2 to 4 cold rows), else 0;
    # with the experts in place (gpu_mode="managed") the GPU computes them all, so any share is refused.
    assert _check_cold_on_device(None, "cuda", "redirect") == 0.34
    assert _check_cold_on_device(None, "cuda", "managed") == 0.0
    assert _check_cold_on_device(None, "host") == _check_cold_on_device(None, "emulated-gpu") == 0.0
    with pytest.raises(ValueError, match="gpu_mode='redirect'"):
        _check_cold_on_device(0.5, "cuda", "managed")


def test_device_slots_resize_and_shadow(text_model):
    layout = read_moe_layout(text_model)
    llm = llamahot.Llama(text_model, hot_experts=2, rebalance_interval=8, slot_device="emulated-gpu",
                         logits_all=True, **LLAMA_KW)
    llm.hot_cache.set_debug(shadow=True, poison=True)
    greedy(llm, steps=16)
    llm.hot_cache.set_hot_experts(layout.n_expert)
    greedy(llm, steps=16)
    stats = llm.hot_cache.stats()
    assert stats["shadow_rows"] > 0 and stats["shadow_mismatches"] == 0
    assert stats["slots_occupied"] > 0
    llm.hot_cache.set_debug(poison=True)
    assert_bit_identical(reference_logits(text_model)[: len(llm.tokenize(PROMPT)) + 16], greedy(llm, steps=16))


def test_a_stop_waits_for_its_layers_copies(moe_model):
    """Asynchronous loads (what cudaMemcpyAsync and events drive on the GPU): a slot is published as
    soon as its copy is issued, with a fence for its layer. The emulated copies land only when the
    shim waits for that fence, so a stop that read a slot before waiting would compute with another
    expert's bytes; and a waiter that lands nothing changes the logits (the control)."""
    from llamahot.slots import _HostCopies

    layout = read_moe_layout(moe_model)
    kw = dict(hot_experts=layout.n_expert_used, rebalance_interval=8, slot_device="emulated-gpu", logits_all=True)
    llm = llamahot.Llama(moe_model, **kw, **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True)
    loading = []
    got = greedy(llm, steps=STEPS, after_each=lambda l: loading.append(l.hot_cache.stats()["slots_loading"]))
    assert_bit_identical(reference_logits(moe_model), got)
    assert llm.hot_cache.slots.copies.waits > 0 and max(loading) > 0, "copies were queued while decoding went on"
    stats = llm.hot_cache.stats()
    assert stats["hits"] > 0 and stats["slots_occupied"] > 0
    # Every wait is the shim's, and counted with its time.
    assert stats["fence_waits"] == llm.hot_cache.slots.copies.waits and stats["fence_wait_ms"] > 0
    llm.close()

    class NeverLand(_HostCopies):
        def _wait(self, fence) -> int:
            self.waits += 1
            return 0

    llm = llamahot.Llama(moe_model, **kw, **LLAMA_KW)
    llm.hot_cache.slots.close()
    llm.hot_cache.slots.use_copies(NeverLand(layout.n_moe_layers))
    got = greedy(llm, steps=STEPS)
    assert llm.hot_cache.slots.copies.waits > 0
    assert (got.view(np.uint32) != reference_logits(moe_model).view(np.uint32)).any()
    llm.close()


@pytest.mark.parametrize("interval", [1, 3])
def test_plans_made_ahead_in_a_worker_stay_exact_and_serve_one_token_late(moe_model, interval):
    """plan_ahead: the policy runs in a worker thread during the next eval, the copies are issued
    after it. Logits stay bit-identical (asynchronous copies, fences, poison); the policy runs off
    the main thread; and the hot sets are the synchronous rebalance's, each serving from one token
    later (same policy decisions, from the routing up to the rebalance)."""
    import threading

    from llamahot.policy import replay

    layout = read_moe_layout(moe_model)
    kw = dict(hot_experts=layout.n_expert_used, rebalance_interval=interval, slot_device="emulated-gpu", logits_all=True)
    llm = llamahot.Llama(moe_model, plan_ahead=True, **kw, **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True)
    threads = set()
    choose = llm.hot_cache.policy.choose

    def recording_choose(resident):
        threads.add(threading.get_ident())
        return choose(resident)

    llm.hot_cache.policy.choose = recording_choose
    trace = []   # per token: routing counts, to replay the same policy with and without the lag
    before = [np.zeros_like(llm.hot_cache.routing_counts())]

    def record(l):
        counts = l.hot_cache.routing_counts()
        trace.append(counts - before[0])
        before[0] = counts

    got = greedy(llm, steps=STEPS, after_each=record)
    assert_bit_identical(reference_logits(moe_model), got)
    assert threading.get_ident() in threads and len(threads) == 2, "the first fill in the caller, then the worker"
    stats = llm.hot_cache.stats()
    # The first fill, then the copies of every plan but the last (issued after the eval that follows it).
    assert stats["experts_loaded"] > 0 and stats["rebalances"] == 1 + STEPS // interval - (STEPS % interval == 0)

    # The replay of the same routing (token by token; the prompt is the first fill) predicts the hits.
    policy = lambda: llamahot.policy.make_policy("decayed", layout.n_moe_layers, layout.n_expert, kw["hot_experts"], interval)
    prompt = np.sum(trace[:1], axis=0)[None]
    per_token = np.concatenate([prompt, np.array(trace[1:])]).astype(np.int64)
    late = replay(policy(), per_token, interval, warmup=1, ahead=True)
    synchronous = replay(policy(), per_token, interval, warmup=1)
    assert stats["hits"] == late["hits"], (stats["hits"], late["hits"], synchronous["hits"])
    # A new prompt is planned at once, in the caller; the worker's plan from the old text (pending after
    # the last step at interval 1) is dropped, not issued first: one load of slots, the prompt's.
    threads.clear()
    rebalances = llm.hot_cache.stats()["rebalances"]
    llm.reset()
    llm.eval(llm.tokenize(b"class Stack:\n    def push(self, item):"))
    assert threads == {threading.get_ident()}
    assert llm.hot_cache.stats()["rebalances"] == rebalances + 1
    llm.close()


def test_plan_ahead_must_be_a_bool(text_model):
    with pytest.raises(ValueError, match="plan_ahead must be True or False"):
        llamahot.Llama(text_model, hot_experts=1, slot_device="emulated-gpu", plan_ahead="yes", **LLAMA_KW)
    llm = llamahot.Llama(text_model, hot_experts=1, slot_device="emulated-gpu", plan_ahead=True, **LLAMA_KW)
    assert llm.__getstate__()["plan_ahead"] is True  # a pickled Llama keeps it
    with pytest.raises(ValueError, match="plan_ahead must be True or False"):
        llm.hot_cache.use_policy(llm.hot_cache.policy, plan_ahead=1)
    assert llm.hot_cache.plan_ahead is True
    llm.close()


def test_a_lone_cold_row_on_one_thread_stays_exact(all_moe_models):
    """set_lone_row_idle_ms: a stop whose CPU work is a single expert row (here ≥ 1 MiB of weights,
    so it would use every thread) runs it on one thread after the given idle time."""
    path = all_moe_models["qwen3moe-mini"]
    layout = read_moe_layout(path)
    assert layout.expert_bytes >= 1 << 20, "the fixture must have experts big enough for several threads"
    llm = llamahot.Llama(path, hot_experts=layout.n_expert * 3 // 4, rebalance_interval=8, slot_device="emulated-gpu",
                         logits_all=True, **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True)
    llm.hot_cache.set_lone_row_idle_ms(1e-6)
    assert_bit_identical(reference_logits(path), greedy(llm, steps=STEPS))
    stats = llm.hot_cache.stats()
    assert 0 < stats["lone_row_runs"] <= stats["cpu_runs"]
    # Cold rows only on the CPU here: graphs of every size up to n_expert_used, counted by size.
    by_rows = stats["cpu_runs_by_rows"]
    assert sum(by_rows) == stats["cpu_runs"] and by_rows[0] == 0 and by_rows[1] >= stats["lone_row_runs"]
    assert sum(rows * runs for rows, runs in enumerate(by_rows)) == stats["cpu_rows"]
    assert sum(stats["cpu_ms_by_rows"]) == pytest.approx(stats["cpu_compute_ms"])
    with pytest.raises(ValueError, match="idle time"):
        llm.hot_cache.set_lone_row_idle_ms(-1)
    llm.close()


def test_single_token_cpu_rows_use_the_sliced_matmul(moe_model):
    """A single-token stop computes its CPU rows with the shim's row-sliced MUL_MAT_ID node (ggml's
    from_float and vec_dot; each thread quantizes the input itself and takes one slice of rows of
    every expert): logits and every row bit-identical to llama's own, and to the shim's graphs with
    ggml's MUL_MAT_ID (the benchmarks' comparison mode)."""
    layout = read_moe_layout(moe_model)
    expected = reference_logits(moe_model)
    for ggml_matmuls in (False, True):
        llm = llamahot.Llama(moe_model, hot_experts=max(1, layout.n_expert // 4), rebalance_interval=8,
                             slot_device="emulated-gpu", logits_all=True, **LLAMA_KW)
        llm.hot_cache.set_debug(poison=True, ggml_matmuls=ggml_matmuls)
        llm.hot_cache.set_threads(1 if not ggml_matmuls else LLAMA_KW["n_threads"])
        assert_bit_identical(expected, greedy(llm, steps=STEPS, after_each=no_open_mutations))
        stats = llm.hot_cache.stats()
        assert stats["misses"] > 0 and stats["cpu_runs"] > 0
        # Every CPU graph here is a single-token stop's cold part (the prompt ran before the slots
        # existed): one sliced node per expert projection, or none at all in ggml's mode.
        n_proj = len(layout.projections)
        assert stats["sliced_matmuls"] == (0 if ggml_matmuls else n_proj * stats["cpu_runs"])
        # When the threads of those graphs first entered a sliced node: timed for every one of them.
        assert stats["sliced_graphs"] == (0 if ggml_matmuls else stats["cpu_runs"])
        assert 0 <= stats["first_thread_in_ms"] <= stats["last_thread_in_ms"] <= stats["cpu_compute_ms"]
        if not ggml_matmuls:
            # ... and each sliced node of them (gate, up, down), when its last thread entered and left it.
            ins, outs = stats["sliced_node_last_in_ms"], stats["sliced_node_last_out_ms"]
            assert ins[0] == stats["last_thread_in_ms"] and ins[n_proj:] == outs[n_proj:] == [0.0] * (4 - n_proj)
            assert all(0 < ins[k] <= outs[k] for k in range(n_proj))
            assert outs[n_proj - 1] <= stats["cpu_compute_ms"]
            # More threads than the graphs so far were built for: each needs its own quantized rows.
            llm.hot_cache.set_threads(LLAMA_KW["n_threads"])
            assert_bit_identical(expected[: len(llm.tokenize(PROMPT)) + 16], greedy(llm, steps=16))
            assert_shadow_rows_match(llm)   # node level: every row against llama's own
        llm.close()


def test_sliced_matmuls_prefetch_their_rows_ahead(moe_model):
    """set_row_prefetch: each thread of a sliced node prefetches ahead of the rows it computes, across
    its slices of the node's experts. Hints only: logits stay bit-identical at every distance (shorter
    than a row, the default, the largest), and every byte of every slice is prefetched once (the
    counter), none when off."""
    layout = read_moe_layout(moe_model)
    expected = reference_logits(moe_model)
    for distance in (0, 64, 4096, 1 << 20):
        # A new instance each time: its prompt runs before the slots exist, so every CPU graph after it
        # is a single-token stop's (sliced nodes only).
        llm = llamahot.Llama(moe_model, hot_experts=max(1, layout.n_expert // 4), rebalance_interval=8,
                             slot_device="emulated-gpu", logits_all=True, **LLAMA_KW)
        assert llm.hot_cache.row_prefetch == 4096   # the default
        llm.hot_cache.set_debug(poison=True)
        llm.hot_cache.set_row_prefetch(distance)
        assert_bit_identical(expected[: len(llm.tokenize(PROMPT)) + 24], greedy(llm, steps=24))
        stats = llm.hot_cache.stats()
        assert stats["cpu_rows"] > 0 and stats["sliced_matmuls"] > 0
        # Every CPU row is one expert's matrices, each sliced over the threads: all of it, exactly once.
        assert stats["row_prefetch_bytes"] == (stats["cpu_rows"] * layout.expert_matrix_bytes if distance else 0)
        llm.close()
    llm = llamahot.Llama(moe_model, hot_experts=1, slot_device="emulated-gpu", **LLAMA_KW)
    for bad in (-1, (1 << 20) + 1, 1.5, True):
        with pytest.raises(ValueError, match="set_row_prefetch"):
            llm.hot_cache.set_row_prefetch(bad)
    llm.close()


@pytest.mark.parametrize("n", [768, 100, 5], ids=["qwen3-ff", "ragged", "shorter-than-a-step"])
def test_co_sliced_glu_is_bit_exact_on_this_cpu(n):
    """Co-slicing computes each GLU kind of ggml slice by slice at LH_SLICE_ALIGN steps: every element
    has the bits of ggml's whole-row kernel, for teams of 1 to 17 threads. (Small differences there
    mostly vanish in the down matmul's input quantization, so the logits tests alone would not see
    them: slicing at single elements fails this test, not them.)"""
    from llamahot._shim import lib
    assert lib.lh_check_co_slicing(n, 3, 17) == 0
    assert lib.lh_check_co_slicing(0, 3, 17) == -1   # nothing to check


@pytest.mark.parametrize("spin_ms", [0.0, 5.0], ids=["sleep-at-once", "spin"])
def test_single_token_stops_on_the_shims_own_threads(moe_model, spin_ms):
    """set_thread_pool: single-token stops run their CPU graphs (sliced matmuls, and the GLU and bias
    ADD_IDs between them each thread on the slices it computed, with ggml's kernels) on the shim's own
    threads: logits bit-identical with poison, every row identical to llama's at node level, on 1, 2
    and 4 threads (uneven slices: 3 workers); off again, ggml's graph compute takes over. A stop with a
    GPU part starts its cold rows on the workers before the caller submits that part (early); the same
    bits when they start after it (cold_after_submit), and with the element-wise nodes on one thread
    between barriers (serial_elementwise)."""
    layout = read_moe_layout(moe_model)
    expected = reference_logits(moe_model)
    llm = llamahot.Llama(moe_model, hot_experts=max(1, layout.n_expert // 4), rebalance_interval=8,
                         slot_device="emulated-gpu", logits_all=True, **LLAMA_KW)
    llm.hot_cache.set_debug(poison=True, all_threads=True)   # the small fixtures' stops too
    llm.hot_cache.set_thread_pool(spin_ms)
    assert_bit_identical(expected, greedy(llm, steps=STEPS, after_each=no_open_mutations))
    stats = llm.hot_cache.stats()
    # Every CPU graph here is a single-token stop's cold part (the prompt ran before the slots existed).
    assert stats["cpu_runs"] > 0 and stats["pool_graphs"] == stats["cpu_runs"]
    assert stats["sliced_graphs"] == stats["cpu_runs"]
    # Those with a hot part on the device started before its submission (the others have no GPU part).
    assert 0 < stats["early_pool_graphs"] <= stats["pool_graphs"]
    assert 0 < stats["stop_setup_ms"] < stats["redirect_ms"]   # split, graphs, gathers: part of each stop
    # Every graph's GLU (gpt-oss: also the gate's and up's bias ADD_IDs) ran on each thread's slices.
    glu_and_biases = 3 if "gptoss" in moe_model else 1
    assert stats["co_sliced_nodes"] == glu_and_biases * stats["cpu_runs"]
    # The cold rows after the submission, the caller computing its share: the same bits.
    llm.hot_cache.set_debug(poison=True, all_threads=True, cold_after_submit=True)
    llm.hot_cache.reset()
    assert_bit_identical(expected[: len(llm.tokenize(PROMPT)) + 16], greedy(llm, steps=16))
    stats = llm.hot_cache.stats()
    assert stats["pool_graphs"] > 0 and stats["early_pool_graphs"] == 0
    assert stats["co_sliced_nodes"] == glu_and_biases * stats["sliced_graphs"] > 0   # the prompt's graphs: ggml's
    # Four threads (three workers while the caller submits: slices of unequal length), both orders.
    llm.hot_cache.set_threads(4)
    for cold_after_submit in (False, True):
        llm.hot_cache.set_debug(poison=True, all_threads=True, cold_after_submit=cold_after_submit)
        llm.hot_cache.reset()
        assert_bit_identical(expected[: len(llm.tokenize(PROMPT)) + 16], greedy(llm, steps=16))
        assert llm.hot_cache.stats()["co_sliced_nodes"] == glu_and_biases * llm.hot_cache.stats()["sliced_graphs"] > 0
    llm.hot_cache.set_threads(LLAMA_KW["n_threads"])
    # The element-wise nodes on one thread between barriers (as before co-slicing): the same bits.
    llm.hot_cache.set_debug(poison=True, all_threads=True, serial_elementwise=True)
    llm.hot_cache.reset()
    assert_bit_identical(expected[: len(llm.tokenize(PROMPT)) + 16], greedy(llm, steps=16))
    stats = llm.hot_cache.stats()
    assert stats["pool_graphs"] > 0 and stats["co_sliced_nodes"] == 0
    # A CPU graph that takes ggml's way (its matmuls not sliced) does not run on the pool.
    llm.hot_cache.set_debug(poison=True, all_threads=True, ggml_matmuls=True)
    llm.hot_cache.reset()
    assert_bit_identical(expected[: len(llm.tokenize(PROMPT)) + 16], greedy(llm, steps=16))
    stats = llm.hot_cache.stats()
    assert stats["pool_graphs"] == 0 and stats["cpu_runs"] > 0
    llm.hot_cache.set_debug(poison=True, all_threads=True)
    llm.hot_cache.set_threads(1)   # on the caller alone: no thread woken
    llm.hot_cache.reset()
    assert_bit_identical(expected[: len(llm.tokenize(PROMPT)) + 16], greedy(llm, steps=16))
    assert llm.hot_cache.stats()["pool_graphs"] == 0, "one thread: the caller alone"
    llm.hot_cache.set_threads(LLAMA_KW["n_threads"])
    llm.hot_cache.reset()
    assert assert_shadow_rows_match(llm, all_threads=True)["pool_graphs"] > 0   # every row against llama's own
    llm.hot_cache.set_debug()
    llm.hot_cache.set_thread_pool(None)
    llm.hot_cache.reset()
    greedy(llm, steps=4)
    assert llm.hot_cache.stats()["pool_graphs"] == 0 and llm.hot_cache.stats()["cpu_runs"] > 0
    with pytest.raises(ValueError, match="milliseconds"):
        llm.hot_cache.set_thread_pool(-1)
    llm.close()


# -- experts in place (gpu_mode="managed"): the bookkeeping, with pages that would move recorded -----

def resident_ranges(llm) -> set[int]:
    """Addresses of every matrix of every expert the slot maps call resident (in VRAM on CUDA)."""
    slots = llm.hot_cache.slots
    layers, experts = np.nonzero(slots.resident())
    return set(slots.src[layers, :, experts].ravel().tolist())


def test_experts_in_place_compute_as_stock_and_move_the_hot_pages(moe_model):
    """gpu_mode="managed" on the emulated GPU: llama.cpp computes every expert itself (no stop
    redirects), so logits are stock's bit for bit, while the pages the hot set names are the ones
    moved to the GPU, evicted ones move out, and changing K moves the rest out."""
    from llamahot.benchmark import StockPlaced

    layout = read_moe_layout(moe_model)
    stock = StockPlaced(moe_model, cpu_pattern=None, logits_all=True, **LLAMA_KW)
    expected = greedy(stock, steps=24)
    stock.close()
    for k in sorted({layout.n_expert_used, layout.n_expert // 2}):
        llm = llamahot.Llama(moe_model, hot_experts=k, rebalance_interval=1, slot_device="emulated-gpu",
                             gpu_mode="managed", logits_all=True, **LLAMA_KW)
        pages = llm.hot_cache._pages
        slots = llm.hot_cache.slots
        # Every expert tensor mapped cold once, inside the weight buffers kept on the GPU.
        tensors = slots._tensor_ranges()
        assert sorted(pages.cold) == sorted(tensors)
        assert all(any(b <= a and a + n <= b + size for b, size in pages.kept) for a, n in tensors)
        moved = []
        logits = greedy(llm, steps=24, after_each=lambda m: moved.append(resident_ranges(m) == pages.on_gpu))
        assert all(moved), "the pages on the GPU differ from the hot set after some step"
        assert_bit_identical(logits, expected)
        stats = llm.hot_cache.stats()
        assert stats["gpu_mode"] == "managed" and stats["cold_on_device"] == 0.0
        assert stats["ffn_redirects"] == 0 and stats["redirected_nodes"] == 0
        assert stats["hits"] > 0 and stats["misses"] > 0 and stats["experts_loaded"] > k
        assert stats["slot_bytes"] == k * layout.expert_matrix_bytes * layout.n_moe_layers
        assert (llm.hot_cache.hot_sets() >= 0).sum(axis=1).max() == k
        llm.hot_cache.set_hot_experts(1)   # the old hot set's pages leave with the change
        assert pages.on_gpu == set()
        greedy(llm, steps=4)
        assert resident_ranges(llm) == pages.on_gpu and len(pages.on_gpu) <= layout.n_moe_layers * len(slots.projections)
        assert llm.hot_cache.open_mutations() == 0
        llm.close()


def test_experts_in_place_refuse_redirect_options_and_default_to_a_sticky_policy(text_model):
    with pytest.raises(ValueError, match="gpu_mode='redirect'"):
        llamahot.Llama(text_model, hot_experts=1, slot_device="emulated-gpu", gpu_mode="managed",
                       cold_on_device=0.5, **LLAMA_KW)
    # Moving pages costs more than a slot copy: rebalance every 64 tokens, decayed half-life 2048, margin 3;
    # routing read at every step (one in n is an option).
    llm = llamahot.Llama(text_model, hot_experts=1, slot_device="emulated-gpu", gpu_mode="managed", **LLAMA_KW)
    policy = llm.hot_cache.policy
    assert llm.hot_cache.rebalance_interval == 64 and policy.margin == 3.0
    assert policy.decay_per_token == pytest.approx(0.5 ** (1 / 2048))
    assert llm.hot_cache.observe_every is None and llm.hot_cache.stats()["observe_every"] == 1
    with pytest.raises(ValueError, match="observe_every"):
        llm.hot_cache.set_observe_every(0)
    with pytest.raises(ValueError, match="burst must be an integer >= 1, got 0"):
        llm.hot_cache.set_observe_every(4, burst=0)
    llm.close()
    llm = llamahot.Llama(text_model, hot_experts=1, slot_device="emulated-gpu", **LLAMA_KW)   # redirect
    assert llm.hot_cache.rebalance_interval == 4 and llm.hot_cache.policy.margin == 0.25
    with pytest.raises(ValueError, match="stay in place"):   # every redirected step must be observed
        llm.hot_cache.set_observe_every(2)
    llm.close()


def test_experts_in_place_observe_one_step_in_n_and_stay_exact(text_model):
    from llamahot.benchmark import StockPlaced

    stock = StockPlaced(text_model, cpu_pattern=None, logits_all=True, **LLAMA_KW)
    expected = greedy(stock, steps=17)
    stock.close()
    llm = llamahot.Llama(text_model, hot_experts=2, slot_device="emulated-gpu", gpu_mode="managed",
                         rebalance_interval=1, logits_all=True, **LLAMA_KW)
    # steps 0, 4, 8, 12, 16 of 17, the others without the callback (or with it: stay_hooked); in bursts of 3
    # in every 12 steps 0, 1, 2, 12, 13, 14; then all
    for every, burst, observed, stay_hooked in ((4, 1, 5, False), (4, 1, 5, True), (4, 3, 6, False), (1, 1, 17, False)):
        llm.hot_cache.set_observe_every(every, burst=burst)
        llm.hot_cache.set_debug(stay_hooked=stay_hooked)
        llm.hot_cache.reset()
        logits = greedy(llm, steps=17)
        assert_bit_identical(logits, expected)
        prompt = len(llm.tokenize(PROMPT))
        stats = llm.hot_cache.stats()
        assert stats["tokens"] == prompt + observed, every    # the prompt always, then one step in `every`
        assert stats["unhooked_decodes"] == (0 if stay_hooked else 17 - observed)
        assert stats["split_start_stops"] == 0   # only device splits have CUDA graphs to keep apart
        assert stats["hits"] + stats["misses"] == (prompt + observed) * read_moe_layout(text_model).n_expert_used \
            * llm.hot_cache.layout.n_moe_layers
    llm.close()


def test_experts_in_place_keep_an_application_callback_on_every_decode(text_model):
    """In place with an application's eval callback chained, unread steps keep the callback (the application
    asks about every decode's nodes), and are still not read."""
    from ggml_nodes import NodeRecorder

    layout = read_moe_layout(text_model)
    recorder = NodeRecorder(("ffn_moe_topk",))
    llm = llamahot.Llama(text_model, hot_experts=2, slot_device="emulated-gpu", gpu_mode="managed",
                         logits_all=True, cb_eval=recorder.callback, **LLAMA_KW)
    llm.hot_cache.set_observe_every(4, burst=1)
    llm.hot_cache.reset()
    greedy(llm, steps=8)
    stats = llm.hot_cache.stats()
    assert stats["unhooked_decodes"] == 0
    assert stats["tokens"] == len(llm.tokenize(PROMPT)) + 2    # steps 0 and 4 read
    # the prompt's ubatch and all 8 steps, in every MoE layer
    assert [len(recorder.records["ffn_moe_topk"][b]) for b in layout.moe_blocks] == [9] * len(layout.moe_blocks)
    llm.close()


def test_experts_in_place_check_vram_against_what_was_free_before_the_load(text_model, monkeypatch):
    """In place, VRAM is checked before the model loads (the driver keeps VRAM its managed pages used, so
    the free memory after the load says little): free then, less the model's non-expert weights."""
    import os

    layout = read_moe_layout(text_model)
    llm = llamahot.Llama(text_model, hot_experts=2, slot_device="emulated-gpu", gpu_mode="managed", **LLAMA_KW)
    cache = llm.hot_cache
    per_k = layout.expert_matrix_bytes * layout.n_moe_layers
    other = os.path.getsize(text_model) - layout.expert_tensor_bytes
    free = other + 5 * per_k + per_k // 2 + 512 * 2**20
    monkeypatch.setattr("llamahot.hot_cache.free_vram_bytes", lambda: free)
    cache.measure_vram_in_place(os.path.getsize(text_model))   # K=2 fits
    assert cache._vram_in_place == free - other
    cache.check_vram_in_place(5)
    with pytest.raises(ValueError, match=r"hot_experts=6 needs .* free for them \(VRAM free before the load, less "
                                         r"the model's other weights\)\. The largest hot_experts that fits is 5\."):
        cache.check_vram_in_place(6)
    monkeypatch.setattr("llamahot.hot_cache.free_vram_bytes", lambda: other)
    with pytest.raises(ValueError, match="only 0.00 GiB is free for them"):
        cache.measure_vram_in_place(os.path.getsize(text_model))
    llm.close()


def test_experts_in_place_read_one_step_in_16_once_the_policy_knows_enough_routing(text_model, tmp_path):
    """observe_every None (default): every decode step is read until the routing known (a profile's, or
    observed) reaches IN_PLACE_LEARN_TOKENS in the first MoE layer, then one in IN_PLACE_OBSERVE_EVERY;
    the same with prompts whose rows llama.cpp drops before the last layer (no logits_all)."""
    from llamahot.policy import IN_PLACE_LEARN_TOKENS, IN_PLACE_OBSERVE_BURST, IN_PLACE_OBSERVE_EVERY
    from llamahot.profile import record_profile

    assert (IN_PLACE_LEARN_TOKENS, IN_PLACE_OBSERVE_EVERY, IN_PLACE_OBSERVE_BURST) == (4096, 16, 8)
    text = list(range(10, 510))
    for logits_all in (False, True):
        llm = llamahot.Llama(text_model, hot_experts=2, slot_device="emulated-gpu", gpu_mode="managed",
                             logits_all=logits_all, **LLAMA_KW)
        for i in range(IN_PLACE_LEARN_TOKENS // len(text) + 1):
            assert llm.hot_cache.stats()["observe_every"] == 1, f"switched after {i * len(text)} tokens"
            llm.reset()
            llm.eval(text)
        assert llm.hot_cache.stats()["observe_every"] == IN_PLACE_OBSERVE_EVERY, logits_all
        llm.hot_cache.reset()
        llm.reset()
        for token in text[:130]:   # steps 0-7 and 128-129 read, in bursts of 8 in every 128
            llm.eval([token])
        assert llm.hot_cache.stats()["tokens"] == 10 and llm.hot_cache.stats()["unhooked_decodes"] == 120
        history = llm.hot_cache.routing_history().sum(axis=1)
        assert (history[-1] < history[0]) == (not logits_all)   # the last layer saw one token a prompt
        llm.close()
    kw = dict(LLAMA_KW, logits_all=True)   # every layer routes every prompt token
    # Saving a profile does not count the saved routing twice (2000 in the profile + 1500 observed < 4096).
    profile = tmp_path / "p.npz"
    record_profile(text_model, [text * 4], profile, window=500, slot_device="host", n_threads=2, n_threads_batch=2)
    llm = llamahot.Llama(text_model, hot_experts=2, slot_device="emulated-gpu", gpu_mode="managed",
                         routing_profile=profile, **kw)
    for _ in range(3):
        llm.reset()
        llm.eval(text)
    llm.save_routing_profile()
    llm.reset()
    llm.eval(text[:64])   # a rebalance: 3564 tokens known
    assert llm.hot_cache.stats()["observe_every"] == 1
    llm.close()
    profile.unlink()
    # With a profile of that many tokens: from the start. A fixed setting stays fixed.
    record_profile(text_model, [text * 9], profile, window=500, slot_device="host", n_threads=2, n_threads_batch=2)
    llm = llamahot.Llama(text_model, hot_experts=2, slot_device="emulated-gpu", gpu_mode="managed",
                         routing_profile=profile, **kw)
    assert llm.hot_cache.stats()["observe_every"] == IN_PLACE_OBSERVE_EVERY
    llm.hot_cache.set_observe_every(1)
    llm.eval(text)
    assert llm.hot_cache.stats()["observe_every"] == 1
    llm.close()
