"""The CUDA slot device (run on the GPU machine; skipped on CPU-only builds).

Hot experts are computed by ggml's CUDA backend, so results are not bit-identical to the CPU;
the gate here is greedy tokens identical to stock placement (experts in RAM) and logits close.
"""
from __future__ import annotations

import numpy as np
import pytest

import llamahot
from llamahot.model_info import read_moe_layout

from conftest import LLAMA_KW

pytestmark = pytest.mark.gpu

PROMPT = b"def fibonacci(n):\n    if n < 2:\n        return n\n"


def greedy_tokens(llm, steps: int) -> tuple[list[int], np.ndarray]:
    llm.reset()
    llm.eval(llm.tokenize(PROMPT))
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return tokens, llm.scores[: llm.n_tokens].copy()


@pytest.mark.parametrize("preset", ["qwen3moe-mini", "gptoss-tiny"])
def test_cuda_slots_greedy_tokens_match_experts_in_ram(all_moe_models, preset):
    path = all_moe_models[preset]
    layout = read_moe_layout(path)
    # Experts in RAM, everything else on the GPU, nothing redirected: stock placement.
    ram = llamahot.Llama(path, hot_experts=0, slot_device="cuda", logits_all=True, **LLAMA_KW)
    expected_tokens, expected = greedy_tokens(ram, 64)
    ram.close()
    for k in (layout.n_expert_used, layout.n_expert):
        llm = llamahot.Llama(path, hot_experts=k, rebalance_interval=16, slot_device="cuda", logits_all=True,
                             **LLAMA_KW)
        tokens, got = greedy_tokens(llm, 64)
        stats = llm.hot_cache.stats()
        assert stats["hits"] > 0 and stats["redirected_nodes"] > 0
        assert tokens == expected_tokens
        assert np.isfinite(got).all()
        assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
        assert llm.hot_cache.open_mutations() == 0
        llm.close()
