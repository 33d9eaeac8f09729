"""llamahot.Llama against stock llama_cpp.Llama on the project's synthetic MoE models (CPU)."""
from __future__ import annotations

import gc
import subprocess
import sys

import llama_cpp
import numpy as np
import pytest

import llamahot
from llamahot.model_info import read_moe_layout

from conftest import LLAMA_KW
from ggml_nodes import NodeRecorder

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
GREEDY_STEPS = 32


def greedy_logits(llm: llama_cpp.Llama, steps: int = GREEDY_STEPS) -> np.ndarray:
    """Logits of every prompt position and of `steps` greedy decode steps, one token per eval."""
    llm.reset()
    llm.eval(llm.tokenize(PROMPT.encode()))
    for _ in range(steps):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return llm.scores[: llm.n_tokens].copy()


def test_logits_bit_identical_to_stock(moe_model):
    stock = llama_cpp.Llama(moe_model, logits_all=True, **LLAMA_KW)
    expected = greedy_logits(stock)
    stock.close()

    hot = llamahot.Llama(moe_model, hot_experts=0, logits_all=True, **LLAMA_KW)
    got = greedy_logits(hot)
    assert np.isfinite(expected).all()
    assert expected.shape == got.shape
    # Bit-identical, not merely close: compare the raw float32 bits.
    mismatched = np.flatnonzero((expected.view(np.uint32) != got.view(np.uint32)).any(axis=1))
    assert mismatched.size == 0, f"logits differ at positions {mismatched[:10]}"
    # The callback really ran on every MoE layer of every ubatch.
    stats = hot.hot_cache.stats()
    n_prompt = len(hot.tokenize(PROMPT.encode()))
    assert stats["tokens"] == n_prompt + GREEDY_STEPS
    assert stats["ubatches"] == 1 + GREEDY_STEPS
    assert stats["managed_nodes"] == stats["ubatches"] * hot.hot_cache.layout.n_moe_layers


def test_routing_counts_exact(moe_model):
    """Counts equal routing read independently from the router's top-k nodes (a chained callback)."""
    layout = read_moe_layout(moe_model)
    recorder = NodeRecorder(("ffn_moe_topk", "ffn_moe_logits"))
    llm = llamahot.Llama(moe_model, hot_experts=0, cb_eval=recorder.callback, **LLAMA_KW)
    llm.eval(llm.tokenize(PROMPT.encode()))
    for tok in llm.tokenize(b" return fibonacci(n - 1) + fibonacci(n - 2)", add_bos=False):
        llm.eval([tok])

    expected = np.zeros((layout.n_moe_layers, layout.n_expert), dtype=np.int64)
    topk = recorder.stacked("ffn_moe_topk")
    assert sorted(topk) == list(layout.moe_blocks), "the chained callback saw every MoE layer"
    for blk, selected in topk.items():
        assert selected.shape[1] == layout.n_expert_used
        np.add.at(expected[layout.blk_to_moe()[blk]], selected.ravel(), 1)

    counts = llm.hot_cache.routing_counts()
    assert counts.dtype == np.int64 and counts.shape == expected.shape
    np.testing.assert_array_equal(counts, expected)
    # Every token is routed in the first MoE layer; llama.cpp drops the rows whose logits are not
    # wanted before the last layer, so later layers may see fewer.
    assert counts[0].sum() == llm.hot_cache.stats()["tokens"] * layout.n_expert_used

    # Where selection is a plain top-k of the router logits, recompute it from them too.
    if layout.arch == "qwen3moe":
        for blk, logits in recorder.stacked("ffn_moe_logits").items():
            top = np.argsort(-logits, axis=1, kind="stable")[:, : layout.n_expert_used]
            np.testing.assert_array_equal(np.sort(top, axis=1), np.sort(topk[blk], axis=1))


def test_text_generation_chat_stream_and_state(text_model):
    llm = llamahot.Llama(text_model, hot_experts=2, **LLAMA_KW)
    tokens = llm.tokenize(b"Hello, world")
    assert llm.detokenize(tokens, prev_tokens=None).decode().strip() == "Hello, world"

    out = llm.create_completion("def add(a, b):", max_tokens=16, temperature=0.0)
    text = out["choices"][0]["text"]
    assert isinstance(text, str) and out["usage"]["completion_tokens"] > 0

    streamed = "".join(c["choices"][0]["text"] for c in
                       llm.create_completion("def add(a, b):", max_tokens=16, temperature=0.0, stream=True))
    assert streamed == text, "streaming and non-streaming greedy completions agree"

    chat = llm.create_chat_completion(messages=[{"role": "user", "content": "Say hi"}], max_tokens=8)
    assert chat["choices"][0]["message"]["role"] == "assistant"

    # save_state / load_state round trip: continuing from a restored state gives the same logits.
    llm.reset()
    llm.eval(llm.tokenize(b"import os\n"))
    state = llm.save_state()
    llm.eval([401])
    continued = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    llm.eval([7, 8])
    llm.load_state(state)
    llm.eval([401])
    restored = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    np.testing.assert_array_equal(restored, continued)

    stats = llm.hot_cache.stats()
    assert stats["decode_tokens"] > 0 and stats["decode_tok_s"] > 0
    assert stats["prefill_tokens"] > 0 and stats["prefill_tok_s"] > 0
    assert stats["tokens"] > 0 and stats["ubatches"] > 0


def test_hot_experts_none_is_stock(text_model):
    llm = llamahot.Llama(text_model, **LLAMA_KW)
    assert llm.hot_cache is None
    assert llm.model_params.tensor_buft_overrides is None
    assert not llm.context_params.cb_eval
    assert llm.create_completion("x = ", max_tokens=4)["choices"][0]["text"] is not None


def test_models_load_without_extra_cpu_buffer_types(text_model):
    """llamahot.Llama and the benchmarks' stock placement load without repacked/AMX weight buffers, whatever
    llama.cpp's default (conftest turns the default off for plain stock llamas; this checks both classes
    against llama.cpp's own default): on a CPU with AMX, stock llama-cpp-python 0.3.36 crashes with them."""
    from llamahot.benchmark import StockPlaced
    from llamahot.model_info import EXPERT_TENSOR_PATTERN

    import conftest
    original = llama_cpp.llama_cpp.llama_model_default_params
    llama_cpp.llama_cpp.llama_model_default_params = conftest._default_model_params
    try:
        assert conftest._default_model_params().use_extra_bufts  # llama.cpp's default: on
        hot = llamahot.Llama(text_model, hot_experts=2, slot_device="host", **LLAMA_KW)
        stock = StockPlaced(text_model, cpu_pattern=EXPERT_TENSOR_PATTERN, **LLAMA_KW)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = original
    assert not hot.model_params.use_extra_bufts and not stock.model_params.use_extra_bufts
    hot.close()
    stock.close()


def test_dense_model_rejected(dense_model):
    with pytest.raises(ValueError, match=r"dense-tiny\.gguf.*not a Mixture-of-Experts"):
        llamahot.Llama(dense_model, hot_experts=4, **LLAMA_KW)
    # Without hot_experts a dense model is simply llama_cpp.Llama.
    llamahot.Llama(dense_model, **LLAMA_KW).close()


@pytest.mark.parametrize("bad", [-1, "many", 2.5, True])
def test_bad_hot_experts_rejected(text_model, bad):
    with pytest.raises(ValueError, match="hot_experts"):
        llamahot.Llama(text_model, hot_experts=bad, **LLAMA_KW)


def test_too_many_hot_experts_rejected(text_model):
    n_expert = read_moe_layout(text_model).n_expert
    with pytest.raises(ValueError, match=rf"hot_experts={n_expert + 1} .*{n_expert} experts"):
        llamahot.Llama(text_model, hot_experts=n_expert + 1, **LLAMA_KW)
    llamahot.Llama(text_model, hot_experts=n_expert, **LLAMA_KW).close()


def test_bad_slot_device_rejected(text_model):
    with pytest.raises(ValueError, match="slot_device"):
        llamahot.Llama(text_model, hot_experts=2, slot_device="tpu", **LLAMA_KW)


def test_gpu_mode_is_checked_and_resolved(text_model, monkeypatch):
    from llamahot import llama as llama_module
    resolve = llama_module._resolve_gpu_mode
    with pytest.raises(ValueError, match="gpu_mode must be None or one of 'managed', 'redirect'"):
        llamahot.Llama(text_model, hot_experts=2, gpu_mode="unified", **LLAMA_KW)
    assert resolve("managed", "host") == (None, "")   # host slots: nothing on a GPU
    assert resolve(None, "emulated-gpu") == ("redirect", "")
    monkeypatch.setattr(llama_module, "managed_memory_supported", lambda: True)
    assert resolve(None, "cuda", 51) == ("managed", "")   # the default: experts in place
    assert resolve("managed", "cuda", 51) == ("managed", "")
    assert resolve("redirect", "cuda", 51) == ("redirect", "")
    # The default falls back to redirect, saying why, where in place has nothing to give or cannot run.
    mode, why = resolve(None, "cuda", 51, cold_on_device=0.5)
    assert mode == "redirect" and "cold_on_device" in why
    assert resolve(None, "cuda", 51, cold_on_device=0.0) == ("managed", "")
    mode, why = resolve(None, "cuda", 0)
    assert mode == "redirect" and "no hot experts" in why
    monkeypatch.setattr(llama_module, "managed_memory_supported", lambda: False)   # e.g. Windows, WSL
    mode, why = resolve(None, "cuda", 51)
    assert mode == "redirect" and "no concurrent managed access" in why
    with pytest.raises(RuntimeError, match="concurrent managed access.*gpu_mode='redirect'"):
        resolve("managed", "cuda", 51)


@pytest.mark.skipif(bool(llama_cpp.llama_supports_gpu_offload()), reason="checks the CPU-only build")
def test_cuda_slots_on_cpu_build_say_what_to_install(text_model):
    with pytest.raises(RuntimeError, match="GGML_CUDA=on"):
        llamahot.Llama(text_model, hot_experts=2, slot_device="cuda", **LLAMA_KW)
    with pytest.warns(UserWarning, match="host slots") as caught:
        llm = llamahot.Llama(text_model, hot_experts=2, slot_device="auto", **LLAMA_KW)
    assert len(caught) == 1
    assert llm.hot_cache.slot_device == "host"


def test_two_instances_count_separately(all_moe_models):
    a = llamahot.Llama(all_moe_models["qwen3moe-tiny"], hot_experts=1, **LLAMA_KW)
    b = llamahot.Llama(all_moe_models["gptoss-tiny"], hot_experts=1, **LLAMA_KW)
    a.eval(a.tokenize(b"abc"))
    b.eval(b.tokenize(b"hello there"))
    a.eval([5])
    na, nb = len(a.tokenize(b"abc")) + 1, len(b.tokenize(b"hello there"))
    assert a.hot_cache.stats()["tokens"] == na
    assert b.hot_cache.stats()["tokens"] == nb
    assert a.hot_cache.routing_counts()[0].sum() == na * a.hot_cache.layout.n_expert_used
    assert b.hot_cache.routing_counts()[0].sum() == nb * b.hot_cache.layout.n_expert_used


def test_close_then_gc(text_model):
    llm = llamahot.Llama(text_model, hot_experts=2, **LLAMA_KW)
    llm.eval(llm.tokenize(b"hello"))
    cache = llm.hot_cache
    tokens_before = cache.stats()["tokens"]
    llm.close()
    llm.close()  # idempotent
    counts = cache.routing_counts()  # the last picture survives close()
    assert counts.sum() > 0
    del llm
    gc.collect()
    assert cache.stats()["tokens"] == tokens_before > 0
    del cache
    gc.collect()


def test_version_mismatch_is_refused():
    code = (
        "import llama_cpp; llama_cpp.__version__ = '0.3.1'\n"
        "try:\n    import llamahot\nexcept ImportError as e:\n    print('REFUSED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "REFUSED" in out and "pip install llama-cpp-python==0.3.36" in out


def test_every_routed_expert_tensor_is_placed_in_host_memory(all_moe_models, capfd):
    """The load log shows each routed-expert tensor (weights and biases) overridden to a CPU buffer."""
    import gguf

    path = all_moe_models["gptoss-tiny"]
    expert_tensors = {t.name for t in gguf.GGUFReader(path).tensors if "_exps." in t.name}
    assert any(name.endswith(".bias") for name in expert_tensors)
    llamahot.Llama(path, hot_experts=1, **{**LLAMA_KW, "verbose": True}).close()
    log = capfd.readouterr().err
    overridden = {line.split()[1] for line in log.splitlines()
                  if line.startswith("tensor ") and "buffer type overridden to CPU" in line}
    assert overridden == expert_tensors
    assert "llamahot: gpt-oss, 4 MoE layers x 32 experts" in log


def test_vram_check_names_the_largest_k_that_fits(text_model):
    from llamahot.slots import check_vram_for_slots, largest_k_that_fits

    layout = read_moe_layout(text_model)
    per_expert = layout.expert_matrix_bytes
    assert 0 < per_expert <= layout.expert_bytes
    free = 10 * per_expert * layout.n_moe_layers + 2**20
    assert largest_k_that_fits(free, per_expert, layout.n_moe_layers, layout.n_expert, reserve=2**20) == 10
    check_vram_for_slots(10, free, per_expert, layout.n_moe_layers, layout.n_expert, reserve=2**20)
    with pytest.raises(ValueError, match=r"hot_experts=11 needs .* The largest hot_experts that fits is 10\."):
        check_vram_for_slots(11, free, per_expert, layout.n_moe_layers, layout.n_expert, reserve=2**20)
    # Plenty of room: capped at the expert count; none at all: 0.
    assert largest_k_that_fits(2**40, per_expert, layout.n_moe_layers, layout.n_expert) == layout.n_expert
    assert largest_k_that_fits(0, per_expert, layout.n_moe_layers, layout.n_expert) == 0


def test_load_progress_is_reported(text_model):
    seen = []
    llamahot.Llama(text_model, hot_experts=2, load_progress=seen.append, **LLAMA_KW).close()
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
