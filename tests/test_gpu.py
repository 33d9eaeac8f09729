"""The CUDA slot device (run on the GPU machine; skipped on CPU-only builds).

Hot experts are computed by ggml's CUDA backend, so results are not bit-identical to the CPU. Two
gates: on the project's trained model, whose predictions are confident (no near-ties between the
top two logits on the prompt used), greedy tokens identical to stock placement (experts in RAM);
on the random-weight presets, whose logits are nearly flat (GPU rounding flips their argmax within
a few tokens, stock all-on-GPU's too), teacher-forced logits as close to stock RAM as stock
all-on-GPU's are.
"""
from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

import llamahot
from llamahot.benchmark import StockPlaced, greedy_run
from llamahot.model_info import EXPERT_TENSOR_PATTERN, read_moe_layout

from conftest import LLAMA_KW, TRAINED_MODEL, assert_one_input_copy_per_persistent_run

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
                             slot_device="cuda", cold_on_device=cold_on_device, plan_ahead=plan_ahead, **LLAMA_KW)
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
        llm = llamahot.Llama(path, hot_experts=k, rebalance_interval=4, slot_device="cuda", **LLAMA_KW)
        _, logits = greedy_run(llm, 64, forced=reference, prompt=CONFIDENT_PROMPT)
        assert llm.hot_cache.stats()["ffn_redirects"] > 0
        assert np.isfinite(logits).all()
        assert np.abs(logits - ram_logits).max() <= 1.5 * gpu_diff + 1e-3, (np.abs(logits - ram_logits).max(), gpu_diff)
        assert llm.hot_cache.open_mutations() == 0
        llm.close()
