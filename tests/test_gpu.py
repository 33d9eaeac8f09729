"""The CUDA slot device (run on the GPU machine; skipped on CPU-only builds).

gpu_mode="managed" (the default where the GPU supports it): llama.cpp computes every expert on the GPU,
the cold ones read from host memory, so logits must be bit-identical to stock llama_cpp.Llama with the
whole model on the GPU, on every fixture, while pages move under it.

gpu_mode="redirect": hot experts are computed by ggml's CUDA backend, cold ones by the CPU, so results
are not bit-identical to either stock placement. Two gates: on the project's trained model, whose
predictions are confident (no near-ties between the top two logits on the prompt used), greedy tokens
identical to stock placement (experts in RAM); on the random-weight presets, whose logits are nearly
flat (GPU rounding flips their argmax within a few tokens, stock all-on-GPU's too), teacher-forced
logits as close to stock RAM as stock all-on-GPU's are.
"""
from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

import llamahot
from llamahot.benchmark import StockPlaced, greedy_run
from llamahot.model_info import EXPERT_TENSOR_PATTERN, read_moe_layout

from conftest import LLAMA_KW, MOE_PRESETS, TRAINED_MODEL, assert_one_input_copy_per_persistent_run

pytestmark = pytest.mark.gpu

CONFIDENT_PROMPT = b"        if self.width <= 0:\n"   # trained model, stock (CPU): top-2 logit gap >= 0.39 for 128 steps
STEPS = 128


def stock_in_ram(path: str) -> StockPlaced:
    """Stock llama_cpp.Llama with every routed expert in host memory (`-ot exps=CPU`), the rest on the GPU."""
    return StockPlaced(path, cpu_pattern=EXPERT_TENSOR_PATTERN, n_gpu_layers=-1, **LLAMA_KW)


# cold_on_device None: the default with CUDA slots (0.34). interval 1: a rebalance after every token, so copies and their fences are in flight at almost every stop;
# plan_ahead: the policy in a worker thread while llama decodes; pool: the stops' CPU graphs on the shim's
# own threads spinning that many ms (set_thread_pool; 20.0 is the default with CUDA slots), None: through
# ggml's OpenMP team.
@pytest.mark.parametrize("resident,cold_on_device,interval,plan_ahead,pool",
                         [(0, None, 4, False, 20.0), (2, 0.0, 4, False, 1.0), (0, 0.5, 4, False, 1.0),
                          (0, 0.0, 1, False, 1.0), (0, 0.0, 1, True, 1.0), (0, 0.0, 4, False, None)])
def test_cuda_slots_greedy_tokens_match_experts_in_ram_on_the_trained_model(all_moe_models, resident, cold_on_device,
                                                                            interval, plan_ahead, pool):
    path = all_moe_models[TRAINED_MODEL]
    layout = read_moe_layout(path)
    stock = stock_in_ram(path)
    expected, stock_logits = greedy_run(stock, STEPS, prompt=CONFIDENT_PROMPT)
    stock.close()
    top2 = np.sort(stock_logits, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 0.1, "the prompt no longer gives confident predictions"
    for k in (layout.n_expert_used, layout.n_expert // 2, layout.n_expert):
        llm = llamahot.Llama(path, hot_experts=k, resident_layers=resident, rebalance_interval=interval,
                             slot_device="cuda", gpu_mode="redirect", cold_on_device=cold_on_device,
                             plan_ahead=plan_ahead, **LLAMA_KW)
        llm.hot_cache.set_debug(all_threads=pool is not None)   # the small model's stops on the pool's threads too
        llm.hot_cache.set_thread_pool(pool)
        tokens, logits = greedy_run(llm, STEPS, prompt=CONFIDENT_PROMPT)
        stats = llm.hot_cache.stats()
        assert stats["hits"] > 0 and stats["ffn_redirects"] > 0
        if k < layout.n_expert:   # cold rows: on the pool when it is on
            assert (stats["pool_graphs"] > 0) == (pool is not None)
            assert (stats["co_sliced_nodes"] > 0) == (pool is not None)   # the GLU on each thread's slices
            assert stats["row_prefetch_bytes"] > 0   # the sliced matmuls prefetch ahead of their rows (default)
        # Single-token steps ran the layers' persistent hot graphs (K >= n_expert_used here), whose
        # inputs lie together in CUDA memory and go up in one copy.
        assert stats["persistent_gpu_runs"] > 0
        assert stats["cold_on_device"] == (0.34 if cold_on_device is None else cold_on_device)   # None: the default
        if cold_on_device == 0:   # (the cold rows sent to the device take copies of their own)
            assert_one_input_copy_per_persistent_run(stats)
            assert stats["device_cold_rows"] == 0
        elif k < layout.n_expert:  # decode steps with misses sent some of them to the GPU, in persistent graphs
            assert stats["device_cold_rows"] > 0 and stats["persistent_dev_runs"] > 0
        assert stats["n_moe_layers"] == layout.n_moe_layers - resident
        assert tokens == expected, f"K={k}: first difference at token {next(i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b)}"
        assert np.isfinite(logits).all()
        assert llm.hot_cache.open_mutations() == 0
        llm.close()


@pytest.mark.parametrize("preset", ["qwen3moe-mini", "gptoss-tiny"])
def test_cuda_slots_logits_as_close_to_ram_as_stock_gpu(all_moe_models, preset):
    path = all_moe_models[preset]
    layout = read_moe_layout(path)
    stock = stock_in_ram(path)
    reference, ram_logits = greedy_run(stock, 64, prompt=CONFIDENT_PROMPT)
    stock.close()
    all_gpu = llama_cpp.Llama(path, n_gpu_layers=-1, **LLAMA_KW)
    _, gpu_logits = greedy_run(all_gpu, 64, forced=reference, prompt=CONFIDENT_PROMPT)
    all_gpu.close()
    gpu_diff = np.abs(gpu_logits - ram_logits).max()
    for k in (layout.n_expert_used, layout.n_expert):
        llm = llamahot.Llama(path, hot_experts=k, rebalance_interval=4, slot_device="cuda", gpu_mode="redirect",
                             **LLAMA_KW)
        _, logits = greedy_run(llm, 64, forced=reference, prompt=CONFIDENT_PROMPT)
        assert llm.hot_cache.stats()["ffn_redirects"] > 0
        assert np.isfinite(logits).all()
        assert np.abs(logits - ram_logits).max() <= 1.5 * gpu_diff + 1e-3, (np.abs(logits - ram_logits).max(), gpu_diff)
        assert llm.hot_cache.open_mutations() == 0
        llm.close()


# -- experts in place (gpu_mode="managed") -------------------------------------------------------------

def teacher_forced_logits(llm, forced: list[int]) -> np.ndarray:
    return greedy_run(llm, len(forced), forced=forced, prompt=CONFIDENT_PROMPT)[1]


@pytest.mark.parametrize("preset", MOE_PRESETS)
def test_managed_experts_logits_bit_identical_to_stock_all_on_gpu(all_moe_models, preset):
    """Every fixture layout (fused gate_up, biases), K from none to all, rebalances after every token
    (pages moving at almost every step), resident layers and a planner thread: logits equal stock's
    all-on-GPU logits bit for bit, teacher-forced over stock's own greedy continuation."""
    path = all_moe_models[preset]
    layout = read_moe_layout(path)
    stock = llama_cpp.Llama(path, n_gpu_layers=-1, **LLAMA_KW)
    forced, expected = greedy_run(stock, 48, prompt=CONFIDENT_PROMPT)
    stock.close()
    cases = [(k, 0, 1, False, 1, False) for k in (0, layout.n_expert_used, layout.n_expert // 2, layout.n_expert)]
    cases += [(layout.n_expert_used, 2, 4, True, 1, False), (layout.n_expert_used, 0, 1, False, 4, False),
              (layout.n_expert_used, 0, 1, False, 4, True)]
    for k, resident, interval, plan_ahead, every, stay_hooked in cases:
        llm = llamahot.Llama(path, hot_experts=k, resident_layers=resident, rebalance_interval=interval,
                             plan_ahead=plan_ahead, slot_device="cuda", gpu_mode="managed", **LLAMA_KW)
        if every > 1:   # one decode step in `every`, two in a row, read (the prompt always): counters from here
            llm.hot_cache.set_observe_every(every, burst=2)
            llm.hot_cache.set_debug(stay_hooked=stay_hooked)
            llm.hot_cache.reset()
        logits = teacher_forced_logits(llm, forced)
        stats = llm.hot_cache.stats()
        case = f"{preset} K={k} resident={resident} observe_every={every} stay_hooked={stay_hooked}"
        read = sum(1 for step in range(len(forced)) if step % (every * 2) < 2) if every > 1 else len(forced)
        if every > 1:
            assert stats["tokens"] == len(llm.tokenize(CONFIDENT_PROMPT)) + read, case
        # Unread steps run without the callback; kept (stay_hooked), they stop once after the device split's
        # first node (ggml-cuda's CUDA graph of the rest then never shares its key with a read step's first
        # piece). Read steps and prompts do neither.
        unread = len(forced) - read
        assert stats["unhooked_decodes"] == (0 if stay_hooked else unread), case
        assert stats["split_start_stops"] % max(unread, 1) == 0, case   # one per device split
        assert (stats["split_start_stops"] > 0) == stay_hooked, case
        assert stats["gpu_mode"] == "managed" and stats["cold_on_device"] == 0.0, case
        assert stats["ffn_redirects"] == 0 and stats["redirected_nodes"] == 0, case   # llama.cpp computed all
        assert stats["tokens"] > 0 and llm.hot_cache.routing_counts().sum() > 0, case   # routing read back
        if 0 < k:
            assert stats["hits"] > 0 and stats["experts_loaded"] > 0, case
            assert stats["slot_bytes"] == k * layout.expert_matrix_bytes * (layout.n_moe_layers - resident), case
        if k < layout.n_expert:
            assert stats["misses"] > 0, case
        assert np.array_equal(logits, expected), f"{case}: max |diff| {np.abs(logits - expected).max()}"
        assert llm.hot_cache.open_mutations() == 0
        llm.close()


def test_managed_experts_change_k_in_place_and_stay_exact(all_moe_models):
    """set_hot_experts moves the old hot set's pages out and fills the new K; logits stay stock's."""
    path = all_moe_models["qwen3moe-mini"]
    stock = llama_cpp.Llama(path, n_gpu_layers=-1, **LLAMA_KW)
    forced, expected = greedy_run(stock, 24, prompt=CONFIDENT_PROMPT)
    stock.close()
    llm = llamahot.Llama(path, hot_experts=4, rebalance_interval=1, slot_device="cuda", gpu_mode="managed",
                         **LLAMA_KW)
    for k in (4, 16, 0, 8):
        llm.hot_cache.set_hot_experts(k)
        assert np.array_equal(teacher_forced_logits(llm, forced), expected), f"K={k}"
        assert (llm.hot_cache.hot_sets() >= 0).sum(axis=1).max() <= k
    llm.close()


def test_default_gpu_mode_is_in_place_where_it_works(all_moe_models):
    """No gpu_mode, no slot_device: on this GPU (concurrent managed access) the experts stay in place and
    logits are stock all-on-GPU's bit for bit; redirect where in place has nothing to give (K=0) or a
    redirect option is asked for."""
    from llamahot.llama import managed_memory_supported

    assert managed_memory_supported()   # the H100 machine, Linux
    path = all_moe_models["qwen3moe-mini"]
    layout = read_moe_layout(path)
    stock = llama_cpp.Llama(path, n_gpu_layers=-1, **LLAMA_KW)
    forced, expected = greedy_run(stock, 24, prompt=CONFIDENT_PROMPT)
    stock.close()
    llm = llamahot.Llama(path, hot_experts=layout.n_expert_used, **LLAMA_KW)
    assert (llm.hot_cache.slot_device, llm.hot_cache.gpu_mode) == ("cuda", "managed")
    assert np.array_equal(teacher_forced_logits(llm, forced), expected)
    llm.close()
    for kw in (dict(hot_experts=0), dict(hot_experts=4, cold_on_device=0.5)):
        llm = llamahot.Llama(path, **kw, **LLAMA_KW)
        assert llm.hot_cache.gpu_mode == "redirect", kw
        llm.close()


def test_managed_mode_rejects_redirect_options(all_moe_models):
    path = all_moe_models["qwen3moe-tiny"]
    with pytest.raises(ValueError, match="gpu_mode='redirect'"):
        llamahot.Llama(path, hot_experts=4, slot_device="cuda", gpu_mode="managed", cold_on_device=0.5, **LLAMA_KW)


@pytest.mark.parametrize("gpu_mode", ["managed", "redirect"])
def test_routing_profile_fills_vram_before_the_first_token_and_stays_exact(all_moe_models, gpu_mode, tmp_path):
    """A profile's hot set goes to VRAM at load (pages moved, or slots copied with cuda-python) and the
    outputs stay as without one: in place bit-identical to stock all-on-GPU, redirected the trained
    model's greedy tokens identical to stock experts-in-RAM."""
    from llamahot.profile import load_profile, record_profile

    path = all_moe_models[TRAINED_MODEL]
    layout = read_moe_layout(path)
    profile = tmp_path / "p.npz"
    text = open(llamahot.policy.__file__, "rb").read()
    n = record_profile(path, [text], profile, window=256, slot_device="cuda")
    # Every token counted in every layer, though llama.cpp ran these prompts' expert matmuls on the GPU
    # (its op offload copies the weights: the shim counts those nodes too).
    assert load_profile(profile, layout).tokens.tolist() == [n] * layout.n_moe_layers
    top = np.argsort(-load_profile(profile, layout).rates(layout), axis=1, kind="stable")
    stock = llama_cpp.Llama(path, n_gpu_layers=-1, **LLAMA_KW) if gpu_mode == "managed" else stock_in_ram(path)
    expected, expected_logits = greedy_run(stock, STEPS, prompt=CONFIDENT_PROMPT)
    stock.close()
    k = layout.n_expert // 2
    llm = llamahot.Llama(path, hot_experts=k, slot_device="cuda", gpu_mode=gpu_mode, routing_profile=profile, **LLAMA_KW)
    hot = llm.hot_cache.hot_sets()
    assert [set(row.tolist()) for row in hot] == [set(row[:k].tolist()) for row in top]
    assert llm.hot_cache.stats()["experts_loaded"] == k * layout.n_moe_layers
    tokens, logits = greedy_run(llm, STEPS, prompt=CONFIDENT_PROMPT)
    assert llm.hot_cache.stats()["hits"] > 0
    if gpu_mode == "managed":
        assert np.array_equal(logits, expected_logits)
    else:
        assert tokens == expected
    llm.close()
