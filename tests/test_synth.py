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


# ---------------------------------------------------------------------------
# Realistic routing (RoutingSpec)
# ---------------------------------------------------------------------------

# sha256 of the tiny presets' files as written before RoutingSpec existed: routing=None must not
# change a byte. (Regenerate only for a deliberate change of the random generator.)
UNROUTED_SHA256 = {
    "qwen3moe-tiny": "c5cd2475d99ce08239506d1225514d562ae640873b0e6be237df15e41e11995f",
    "deepseek2-tiny": "0ba8f1ab325da07382652aa462363f154d848ec773175589591fe7373a6e58fd",
    "gptoss-tiny": "6ea0efd8162b422ab27a790485af2f36d14cf67ddbe25038e83d699c4db62c2b",
    "dense-tiny": "6383f87071ee4e832078e19aa36b42b10981439f40c05fff29c322367ab317f5",
}

# A small shape for the construction: 2 layers, 64 experts (4 used), head_dim 64.
ROUTED_TINY = synth.ModelSpec(
    name="qwen3moe-routed-tiny", arch="qwen3moe", n_layer=2, n_embd=512, n_head=4, n_head_kv=2,
    head_dim=64, n_ff=512, n_expert=64, n_expert_used=4, n_ff_exp=256, routing=synth.RoutingSpec())
UNROUTED_TINY = dataclasses.replace(ROUTED_TINY, name="qwen3moe-unrouted-tiny", routing=None)
ROUTING_TENSORS = {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                   "blk.0.attn_output.weight", "blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight",
                   "blk.0.ffn_gate_inp.weight", "blk.1.ffn_gate_inp.weight", "output_norm.weight"}
TRACE_TOKENS = 384


def _calibrate_module():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import calibrate_routing
    return calibrate_routing


@pytest.fixture(scope="module")
def routed_paths(synth_dir) -> dict[str, Path]:
    return {spec.name: synth.synth_model(synth_dir / f"{spec.name}.gguf", spec)
            for spec in (ROUTED_TINY, UNROUTED_TINY)}


@pytest.fixture(scope="module")
def routed_traces(routed_paths) -> dict[str, np.ndarray]:
    from llamahot.benchmark import record_trace
    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "heldout_code.txt").read_text()
    return {name: record_trace(str(path), text, TRACE_TOKENS) for name, path in routed_paths.items()}


@pytest.mark.parametrize("preset", sorted(UNROUTED_SHA256))
def test_unrouted_presets_are_byte_identical_to_before(tmp_path, preset):
    assert synth.PRESETS[preset].routing is None
    assert _sha256(synth.synth_model(tmp_path / f"{preset}.gguf", preset)) == UNROUTED_SHA256[preset]


def test_routing_touches_only_its_tensors(routed_paths):
    routed, plain = ({t.name: t for t in gguf.GGUFReader(routed_paths[spec.name]).tensors}
                     for spec in (ROUTED_TINY, UNROUTED_TINY))
    assert routed.keys() == plain.keys()
    for name, tensor in routed.items():
        assert tensor.tensor_type == plain[name].tensor_type
        same = bytes(tensor.data) == bytes(plain[name].data)
        assert same == (name not in ROUTING_TENSORS), name


def test_routed_tensors_carry_the_construction(routed_paths):
    spec, tensors = ROUTED_TINY, {t.name: t for t in gguf.GGUFReader(routed_paths[ROUTED_TINY.name]).tensors}
    lay = synth.routing_layout(spec)
    embd = np.asarray(tensors["token_embd.weight"].data, dtype=np.float64)   # [n_vocab, n_embd]
    assert (embd[:, lay.const] == spec.routing.amplitude).all() and (embd[:, lay.context] == 0).all()
    norms = np.linalg.norm(embd[:, lay.token], axis=1)
    np.testing.assert_allclose(norms, spec.routing.amplitude * np.sqrt(spec.head_dim), rtol=1e-3)
    free = embd[:, lay.n_routing_dims:]
    assert abs(free.mean()) < 0.01 and 0.95 < free.std() < 1.05
    for layer in range(spec.n_layer):
        router = np.asarray(tensors[f"blk.{layer}.ffn_gate_inp.weight"].data)  # [n_expert, n_embd]
        assert (router[:, lay.n_routing_dims:] == 0).all()
        # The bias part, read back through the constant direction, is the Zipf profile in nats.
        bias = router[:, lay.const].sum(axis=1) * spec.routing.amplitude / lay.rms
        ranked = -np.sort(-bias)
        np.testing.assert_allclose(ranked[0] - ranked, spec.routing.bias * np.log(np.arange(1, 65)), atol=1e-4)
    # Head 0's q reads only the constant direction, on the recency pairs.
    q = np.asarray(tensors["blk.0.attn_q.weight"].data)[: spec.head_dim]
    assert set(np.flatnonzero(np.abs(q).sum(axis=1))) == set(lay.pairs)
    assert (q[:, lay.n_routing_dims:] == 0).all() and (q[:, lay.token] == 0).all()


def test_recency_window_is_local_even_at_long_context():
    spec = synth.PRESETS["qwen3moe-30b-a3b-routed"]
    d = np.arange(spec.context_length)
    w = synth.recency_weights(spec, spec.context_length)
    assert np.all(np.diff(w[:40]) < 0)                          # decreasing with distance
    assert 0.6 * spec.routing.window < np.sqrt((w * d * d).sum()) < 1.2 * spec.routing.window
    assert w[5 * int(spec.routing.window):].sum() < 1e-3        # nothing leaks to far tokens


def test_llama_cpp_routes_like_the_construction(routed_paths):
    """llama.cpp's forward (RMS norms, NEOX RoPE, GQA, softmax) reproduces the numpy model of the
    construction: layer 0's selections agree except where the other heads' small outputs tip them."""
    calibrate = _calibrate_module()
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    a, b = 0, 1\n" * 3
    path = str(routed_paths[ROUTED_TINY.name])
    real = calibrate.record_trace(path, text, 64) > 0
    sim = calibrate.simulate_trace(ROUTED_TINY, calibrate._tokens(path, text, 64)) > 0
    assert (real & sim).sum(axis=(0, 2))[0] / sim[:, 0].sum() > 0.9


def test_routed_model_routes_with_skew_and_locality(routed_traces):
    from llamahot.routing_stats import report
    uniform = ROUTED_TINY.n_expert_used / ROUTED_TINY.n_expert           # 1/16
    routed = report(routed_traces[ROUTED_TINY.name])
    plain = report(routed_traces[UNROUTED_TINY.name])
    # Random weights: near the uniform baseline (each expert used, little reuse).
    assert plain["mean"]["next_token_reuse"] < 2.4 * uniform
    assert plain["mean"]["experts_for_90pct"] > 0.7
    # The construction: every layer skewed and temporally local, like a trained model
    # (Qwen3-30B-A3B: 0.45 next-token reuse, 0.80 within 8 tokens, 90 % of routing on ~48 %).
    assert (routed["per_layer"]["next_token_reuse"] > 5 * uniform).all()
    assert (routed["per_layer"]["reuse_within_8"] > 0.65).all()
    assert (routed["per_layer"]["experts_for_90pct"] < 0.6).all()


def test_routed_logits_are_finite_and_input_dependent(routed_paths):
    llm = llama_cpp.Llama(str(routed_paths[ROUTED_TINY.name]), n_ctx=256, verbose=False, seed=0, n_threads=2)
    first, second = (_last_logits(llm, prompt) for prompt in PROMPTS)
    for logits in (first, second):
        assert np.isfinite(logits).all() and logits.std() > 0.1
    assert np.abs(first - second).max() > 0.1


def test_routed_synthesis_is_deterministic_and_streamed(tmp_path):
    synth.build_tokenizer()
    tracemalloc.start()
    try:
        a = synth.synth_model(tmp_path / "a.gguf", ROUTED_TINY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20
    assert _sha256(a) == _sha256(synth.synth_model(tmp_path / "b.gguf", ROUTED_TINY))
    assert _sha256(a) != _sha256(synth.synth_model(tmp_path / "c.gguf", ROUTED_TINY, seed=1))


def test_routed_presets_plan_like_their_unrouted_shapes():
    for routed, plain, n_layer in (("qwen3moe-30b-a3b-routed", "qwen3moe-30b-a3b", 48),
                                   ("qwen3moe-routed-mini", None, 4)):
        spec = synth.PRESETS[routed]
        assert spec.routing is not None and spec.n_layer == n_layer
        assert (spec.n_embd, spec.n_expert, spec.n_expert_used, spec.n_ff_exp) == (2048, 128, 8, 768)
        assert spec.expert_qtype == gguf.GGMLQuantizationType.Q4_K
        structured = {p.name for p in synth.plan_tensors(spec) if p.structure is not None}
        assert structured == {n for n in ROUTING_TENSORS if "gate_inp" not in n} | {
            f"blk.{il}.ffn_gate_inp.weight" for il in range(n_layer)}
        if plain:
            unrouted = dataclasses.replace(spec, name=plain, routing=None)
            assert unrouted == synth.PRESETS[plain]   # the same shapes, so the same expert bytes
    assert synth.estimate_file_size(synth.PRESETS["qwen3moe-routed-mini"]) < 1.5 * 2**30


@pytest.mark.parametrize(("changes", "match"), [
    ({"arch": "gpt-oss"}, "qwen3moe only"),
    ({"dense_qtype": gguf.GGMLQuantizationType.Q8_0}, "F16 or F32"),
    ({"n_embd": 256}, "n_embd"),
])
def test_routing_rejects_unsupported_specs(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(ROUTED_TINY, **changes)


def test_routed_model_is_near_qwen3_statistics(routed_traces):
    """The calibration is in nats and tokens, so it carries over to this small shape: the means
    land within a few points of the targets (a broken part, e.g. no bias, no context or a
    2-token window, misses by 0.1 or more)."""
    from llamahot.routing_stats import QWEN3_30B_A3B, report
    mean = report(routed_traces[ROUTED_TINY.name])["mean"]
    assert abs(mean["next_token_reuse"] - QWEN3_30B_A3B["next_token_reuse"]) < 0.07
    assert abs(mean["reuse_within_8"] - QWEN3_30B_A3B["reuse_within_8"]) < 0.07
    low, high = QWEN3_30B_A3B["experts_for_90pct"]
    assert low - 0.05 < mean["experts_for_90pct"] < high + 0.05
