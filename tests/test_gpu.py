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
from llamahot.benchmark import last_logits
from llamahot.hot_cache import HostPlacement
from llamahot.model_info import EXPERT_TENSOR_PATTERN, read_moe_layout

from conftest import LLAMA_KW, TRAINED_MODEL

pytestmark = pytest.mark.gpu

CONFIDENT_PROMPT = b"for i in range(10):\n"   # trained model, stock: top-2 logit gap >= 0.25 for 128 steps
STEPS = 128


class StockInRam(llama_cpp.Llama):
    """Stock llama_cpp.Llama with every routed expert in host memory (`-ot exps=CPU`), the rest on the GPU."""

    def __init__(self, path: str, **kwargs):
        self._placement = HostPlacement(EXPERT_TENSOR_PATTERN)
        super().__init__(path, n_gpu_layers=-1, use_mmap=False, **kwargs)

    @property
    def model_params(self):
        return self.__dict__["model_params"]

    @model_params.setter
    def model_params(self, params):
        params.tensor_buft_overrides = self._placement.address
        self.__dict__["model_params"] = params


def run(llm, prompt: bytes, steps: int, forced: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """Greedy tokens (or the `forced` ones, teacher forcing) and the logits before each."""
    llm.reset()
    llm.eval(llm.tokenize(prompt))
    tokens, logits = [], []
    for i in range(steps):
        row = last_logits(llm)
        logits.append(row)
        tokens.append(int(np.argmax(row)))
        llm.eval([forced[i] if forced is not None else tokens[-1]])
    return tokens, np.stack(logits)


@pytest.mark.parametrize("resident", [0, 2])
def test_cuda_slots_greedy_tokens_match_experts_in_ram_on_the_trained_model(all_moe_models, resident):
    path = all_moe_models[TRAINED_MODEL]
    layout = read_moe_layout(path)
    stock = StockInRam(path, **LLAMA_KW)
    expected, stock_logits = run(stock, CONFIDENT_PROMPT, STEPS)
    stock.close()
    top2 = np.sort(stock_logits, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 0.1, "the prompt no longer gives confident predictions"
    for k in (layout.n_expert_used, layout.n_expert // 2, layout.n_expert):
        llm = llamahot.Llama(path, hot_experts=k, resident_layers=resident, rebalance_interval=4,
                             slot_device="cuda", **LLAMA_KW)
        tokens, logits = run(llm, CONFIDENT_PROMPT, STEPS)
        stats = llm.hot_cache.stats()
        assert stats["hits"] > 0 and stats["ffn_redirects"] > 0
        assert stats["n_moe_layers"] == layout.n_moe_layers - resident
        assert tokens == expected, f"K={k}: first difference at token {next(i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b)}"
        assert np.isfinite(logits).all()
        assert llm.hot_cache.open_mutations() == 0
        llm.close()


@pytest.mark.parametrize("preset", ["qwen3moe-mini", "gptoss-tiny"])
def test_cuda_slots_logits_as_close_to_ram_as_stock_gpu(all_moe_models, preset):
    path = all_moe_models[preset]
    layout = read_moe_layout(path)
    stock = StockInRam(path, **LLAMA_KW)
    reference, ram_logits = run(stock, CONFIDENT_PROMPT, 64)
    stock.close()
    all_gpu = llama_cpp.Llama(path, n_gpu_layers=-1, **LLAMA_KW)
    _, gpu_logits = run(all_gpu, CONFIDENT_PROMPT, 64, forced=reference)
    all_gpu.close()
    gpu_diff = np.abs(gpu_logits - ram_logits).max()
    for k in (layout.n_expert_used, layout.n_expert):
        llm = llamahot.Llama(path, hot_experts=k, rebalance_interval=4, slot_device="cuda", **LLAMA_KW)
        _, logits = run(llm, CONFIDENT_PROMPT, 64, forced=reference)
        assert llm.hot_cache.stats()["ffn_redirects"] > 0
        assert np.isfinite(logits).all()
        assert np.abs(logits - ram_logits).max() <= 1.5 * gpu_diff + 1e-3, (np.abs(logits - ram_logits).max(), gpu_diff)
        assert llm.hot_cache.open_mutations() == 0
        llm.close()
