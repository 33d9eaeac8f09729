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
from llamahot.model_info import read_moe_layout

from conftest import LLAMA_KW
from test_redirect import PROMPT, assert_bit_identical, greedy, no_open_mutations

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
        assert_bit_identical(expected, greedy(llm, steps=STEPS, after_each=no_open_mutations))
        stats = llm.hot_cache.stats()
        assert stats["hits"] > 0 and stats["gpu_submit_ms"] > 0, "hot rows went through the device branch"
        assert stats["redirected_nodes"] == STEPS * layout.n_moe_layers * len(layout.projections)
        assert stats["ffn_redirects"] == (0 if per_node else STEPS * layout.n_moe_layers)
        llm.close()


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
