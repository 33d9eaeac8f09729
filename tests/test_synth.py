"""Tests for llamahot/synth.py: synthetic GGUF models that stock llama.cpp runs."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

import llama_cpp

from llamahot import synth


TINY_PRESETS = ["qwen3moe-tiny", "deepseek2-tiny", "gptoss-tiny", "dense-tiny"]
MOE_ARCH = {"qwen3moe-tiny": "qwen3moe", "deepseek2-tiny": "deepseek2", "gptoss-tiny": "gpt-oss"}
PROMPTS = ["def fibonacci(n):", "Hello, world"]
MAX_FILE_BYTES = 20 * 10**6


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _last_logits(llm: llama_cpp.Llama, prompt: str) -> np.ndarray:
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode()))
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="module")
def model_path(synth_dir, request) -> Path:
    return synth.synth_model(synth_dir / f"{request.param}.gguf", request.param)


@pytest.fixture(scope="module")
def llm(model_path) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(model_path), n_ctx=256, logits_all=False, verbose=False,
                           seed=0, n_threads=2)


def _per_preset(*presets):
    return pytest.mark.parametrize("model_path", presets, indirect=True)


@_per_preset(*TINY_PRESETS)
def test_file_is_small(model_path):
    assert 0 < model_path.stat().st_size <= MAX_FILE_BYTES


@_per_preset(*TINY_PRESETS)
def test_logits_are_finite_and_input_dependent(llm):
    first, second = (_last_logits(llm, prompt) for prompt in PROMPTS)
    for logits in (first, second):
        assert np.isfinite(logits).all()
        assert logits.std() > 0.1
    assert np.abs(first - second).max() > 0.1


@_per_preset(*TINY_PRESETS)
def test_greedy_generation_runs(llm):
    out = llm.create_completion(PROMPTS[0], max_tokens=16, temperature=0.0)
    assert 1 <= out["usage"]["completion_tokens"] <= 16


@_per_preset(*TINY_PRESETS)
def test_tokenizer_round_trips(llm):
    for text in [*PROMPTS, "    return a + b\n\nprint(x)", "caf\u00e9 \u2713"]:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert llm.detokenize(tokens).decode() == text
    assert len(llm.tokenize(b"def fibonacci(n):", add_bos=False)) < len("def fibonacci(n):") / 2


@_per_preset(*MOE_ARCH)
def test_moe_metadata(llm, model_path):
    arch = MOE_ARCH[model_path.stem]
    spec = synth.PRESETS[model_path.stem]
    assert llm.metadata["general.architecture"] == arch
    assert int(llm.metadata[f"{arch}.expert_count"]) == spec.n_expert
    assert int(llm.metadata[f"{arch}.expert_used_count"]) == spec.n_expert_used


@_per_preset("dense-tiny")
def test_dense_model_has_no_experts(llm):
    assert not any("expert" in key for key in llm.metadata)


@_per_preset("qwen3moe-tiny")
def test_chat_completion(llm):
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Hello, world"}], max_tokens=8, temperature=0.0)
    assert out["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(("preset", "present", "absent"), [
    ("qwen3moe-tiny",
     {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"},
     {"ffn_gate_up_exps.weight", "ffn_gate_shexp.weight", "ffn_gate_exps.bias"}),
    ("deepseek2-tiny",
     {"ffn_gate_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_shexp.weight",
      "ffn_up_shexp.weight", "ffn_down_shexp.weight", "exp_probs_b.bias"},
     {"ffn_gate_exps.weight", "ffn_up_exps.weight"}),
    ("gptoss-tiny",
     {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_exps.bias",
      "ffn_up_exps.bias", "ffn_down_exps.bias", "attn_sinks.weight"},
     {"ffn_gate_up_exps.weight"}),
])
def test_moe_layer_tensors(preset, present, absent):
    spec = synth.PRESETS[preset]
    names = {plan.name for plan in synth.plan_tensors(spec)}
    for il in range(spec.n_layer_dense_lead, spec.n_layer):
        assert {f"blk.{il}.{t}" for t in present} <= names
        assert not {f"blk.{il}.{t}" for t in absent} & names


@_per_preset(*MOE_ARCH)
def test_expert_weights_are_zero_mean_with_fan_in_scale(model_path):
    spec = synth.PRESETS[model_path.stem]
    checked = 0
    for tensor in gguf.GGUFReader(model_path).tensors:
        if "_exps.weight" not in tensor.name:
            continue
        assert tensor.tensor_type == spec.expert_qtype
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
        target = 1.0 / np.sqrt(tensor.shape[0])  # fan_in = row length ne0
        assert abs(values.mean()) < 0.02 * target
        assert 0.7 * target < values.std() < 1.3 * target  # MXFP4 scales are powers of two
        checked += 1
    assert checked > 0


def test_same_seed_gives_identical_bytes(tmp_path):
    for preset in TINY_PRESETS:
        a = synth.synth_model(tmp_path / "a.gguf", preset)
        b = synth.synth_model(tmp_path / "b.gguf", preset)
        assert _sha256(a) == _sha256(b), preset
    c = synth.synth_model(tmp_path / "c.gguf", "dense-tiny", seed=1)
    assert _sha256(c) != _sha256(b)


def test_tensor_bytes_depend_only_on_name(tmp_path):
    small = synth.PRESETS["qwen3moe-tiny"]
    bigger = dataclasses.replace(small, name="qwen3moe-tiny-5l", n_layer=5)
    tensors = {}
    for spec in (small, bigger):
        reader = gguf.GGUFReader(synth.synth_model(tmp_path / f"{spec.name}.gguf", spec))
        tensors[spec.name] = {t.name: bytes(t.data) for t in reader.tensors}
    for name in ("token_embd.weight", "blk.3.ffn_gate_exps.weight", "output.weight"):
        assert tensors[small.name][name] == tensors[bigger.name][name]


def test_streaming_writer_memory_is_bounded(tmp_path):
    medium = dataclasses.replace(synth.PRESETS["qwen3moe-tiny"], name="qwen3moe-medium", n_layer=32)
    path = tmp_path / "medium.gguf"
    synth.build_tokenizer()  # cached; keep its one-off cost out of the measurement
    tracemalloc.start()
    try:
        synth.synth_model(path, medium)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    path.unlink()
    assert size > 100 * 2**20
    assert abs(size - synth.estimate_file_size(medium)) < 2**20
    assert peak < min(32 * 2**20, size / 4)


def test_30b_preset_plans_without_generating():
    spec = synth.PRESETS["qwen3moe-30b-a3b"]
    plans = synth.plan_tensors(spec)
    assert 16 * 2**30 < synth.estimate_file_size(spec) < 18 * 2**30
    gate = next(p for p in plans if p.name == "blk.47.ffn_gate_exps.weight")
    assert gate.ne == (2048, 768, 128) and gate.qtype == gguf.GGMLQuantizationType.Q4_K
    # Even the largest tensor (~108 MiB) is generated in small chunks.
    biggest = max(plans, key=lambda p: p.nbytes)
    assert biggest.nbytes > 100 * 2**20
    assert next(synth._tensor_chunks(biggest, seed=0)).nbytes <= 4 * 2**20


def test_deepseek2_lite_rule_is_enforced():
    # llama.cpp's deepseek2 loader treats 26/27-layer models as "lite" (no q_lora).
    base = synth.PRESETS["deepseek2-tiny"]
    with pytest.raises(ValueError, match="q_lora_rank"):
        dataclasses.replace(base, n_layer=27)
    lite = dataclasses.replace(base, n_layer=27, q_lora_rank=0)
    names = {plan.name for plan in synth.plan_tensors(lite)}
    assert "blk.0.attn_q.weight" in names and "blk.0.attn_q_a.weight" not in names


def test_unknown_preset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        synth.synth_model(tmp_path / "x.gguf", "no-such-model")


def test_cli(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "llamahot.synth", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "qwen3moe-30b-a3b" in help_text
    out = tmp_path / "cli.gguf"
    subprocess.run([sys.executable, "-m", "llamahot.synth", "dense-tiny", str(out)],
                   capture_output=True, check=True)
    assert _sha256(out) == _sha256(synth.synth_model(tmp_path / "api.gguf", "dense-tiny"))
