"""Routing profiles (llamahot.profile): recorded from text or by use, the hot set before the first token,
a prior for every policy, exact outputs, and bad files refused with what to do."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import llamahot
from llamahot.model_info import read_moe_layout
from llamahot.policy import LRU, PRIOR_WEIGHT, DecayedFrequency, WindowLFU
from llamahot.profile import load_profile, record_profile

from conftest import LLAMA_KW
from test_emulated_gpu import STEPS as EMULATED_STEPS
from test_emulated_gpu import reference_logits
from test_redirect import PROMPT, assert_bit_identical, assert_shadow_rows_match, greedy, stock_logits

TEXT = b"".join(b"def f%d(x, y):\n    return [x * %d + y for _ in range(%d)]\n\n" % (i, i, i % 7) for i in range(40))


def top_k_sets(rates: np.ndarray, k: int) -> list[set[int]]:
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in rates]


def test_profile_records_the_routing_of_the_text_by_prompt_processing(text_model, tmp_path):
    path = tmp_path / "p.npz"
    window = 64
    n = record_profile(text_model, [TEXT], path, window=window, slot_device="host", n_threads=2, n_threads_batch=2)
    # The same windows through a Llama by hand: the profile's counts are their routing, exactly.
    llm = llamahot.Llama(text_model, hot_experts=0, slot_device="host", logits_all=True,
                         **dict(LLAMA_KW, n_ctx=window, n_batch=window, n_ubatch=window))
    ids = llm.tokenize(TEXT, add_bos=False)
    expected = np.zeros_like(llm.hot_cache.routing_counts())
    for start in range(0, len(ids), window):
        llm.reset()
        llm.hot_cache.reset()
        llm.eval(ids[start:start + window])
        expected += llm.hot_cache.routing_counts()
    llm.close()
    layout = read_moe_layout(text_model)
    profile = load_profile(path, layout)
    assert n == len(ids)
    np.testing.assert_array_equal(profile.counts, expected)
    np.testing.assert_array_equal(profile.blocks, layout.moe_blocks)
    assert profile.tokens == pytest.approx(np.full(layout.n_moe_layers, n)), "every layer saw every token"
    # Recording again adds to it.
    record_profile(text_model, [TEXT], path, window=window, slot_device="host", n_threads=2, n_threads_batch=2)
    np.testing.assert_array_equal(load_profile(path, layout).counts, 2 * expected)


@pytest.mark.parametrize("slots", ["host", "emulated-gpu", "managed"])
def test_profile_fills_the_hot_set_before_the_first_token_and_stays_exact(moe_model, slots, tmp_path):
    layout = read_moe_layout(moe_model)
    path = tmp_path / "p.npz"
    record_profile(moe_model, [TEXT], path, window=128, slot_device="host", n_threads=2, n_threads_batch=2)
    rates = load_profile(path, layout).rates(layout)
    before = path.read_bytes()
    k = max(1, layout.n_expert // 2)
    kw = dict(slot_device="host") if slots == "host" else \
        dict(slot_device="emulated-gpu", gpu_mode="managed" if slots == "managed" else "redirect")
    llm = llamahot.Llama(moe_model, hot_experts=k, routing_profile=path, logits_all=True, **kw, **LLAMA_KW)
    # Before any token: the K experts the profile routes to most, in every layer (a slot is published
    # when its copy is issued).
    assert [set(row[row >= 0].tolist()) for row in llm.hot_cache.hot_sets()] == top_k_sets(rates, k)
    if slots == "managed":
        from test_emulated_gpu import resident_ranges
        assert resident_ranges(llm) == llm.hot_cache._pages.on_gpu
    # Outputs as without llamahot, bit for bit, from the first token on.
    if slots == "host":
        expected = stock_logits(moe_model)
    elif slots == "emulated-gpu":   # the same placement with K = 0
        expected = reference_logits(moe_model)
    else:   # in place: stock with everything on the (emulated) GPU
        from llamahot.benchmark import StockPlaced
        stock = StockPlaced(moe_model, cpu_pattern=None, logits_all=True, **LLAMA_KW)
        expected = greedy(stock, steps=EMULATED_STEPS)
        stock.close()
    assert_bit_identical(expected, greedy(llm, steps=len(expected) - len(llm.tokenize(PROMPT))))
    assert llm.hot_cache.stats()["hits"] > 0
    if slots != "managed":
        assert_shadow_rows_match(llm)
    history = llm.hot_cache.routing_history()
    assert path.read_bytes() == before, "the profile is written when the Llama closes, not before"
    llm.close()
    # Closing added what this Llama observed (its shadow steps included).
    after = load_profile(path, layout)
    np.testing.assert_array_equal(after.counts, load_profile_counts_from(before, tmp_path, layout) + history)


def load_profile_counts_from(data: bytes, tmp_path, layout) -> np.ndarray:
    copy = tmp_path / "before.npz"
    copy.write_bytes(data)
    return load_profile(copy, layout).counts


def test_prior_orders_the_first_fill_and_stays_beside_observed_routing():
    rates = np.array([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3]])
    empty = np.zeros((1, 6), dtype=bool)
    for policy in (DecayedFrequency(1, 6, 3), WindowLFU(1, 6, 3, window=60), LRU(1, 6, 3)):
        policy.set_prior(rates)
        assert set(np.flatnonzero(policy.choose(empty))) == {1, 3, 5}, policy.name
    # Decayed: the prior is the score a steady routing at these rates settles to, at PRIOR_WEIGHT, and it
    # does not decay: a burst on expert 4 makes it hot, and once the burst has faded the profile's
    # favourites are the hot set again.
    decayed = DecayedFrequency(1, 6, 2, half_life=16, margin=0.0)
    decayed.set_prior(rates)
    np.testing.assert_allclose(decayed.hotness(), PRIOR_WEIGHT * rates / (1 - 0.5 ** (1 / 16)))
    burst = np.array([[0, 0, 0, 0, 8, 0]])
    decayed.observe(burst, 1)
    assert set(np.flatnonzero(decayed.choose(empty))) == {3, 4}
    for _ in range(200):
        decayed.observe(burst * 0, 1)
    assert set(np.flatnonzero(decayed.choose(empty))) == {1, 3}
    np.testing.assert_allclose(decayed.hotness(), PRIOR_WEIGHT * rates / (1 - 0.5 ** (1 / 16)), atol=1e-2)
    # LRU: recency decides; the prior only breaks ties.
    lru = LRU(1, 6, 1)
    lru.set_prior(rates)
    lru.observe(np.array([[1, 0, 0, 0, 0, 0]]), 1, np.array([[1, 0, 0, 0, 0, 0]]))
    assert np.flatnonzero(lru.choose(empty)).tolist() == [0]


def test_use_policy_gives_the_new_policy_the_prior(text_model, tmp_path):
    layout = read_moe_layout(text_model)
    path = tmp_path / "p.npz"
    record_profile(text_model, [TEXT], path, window=128, slot_device="host", n_threads=2, n_threads_batch=2)
    llm = llamahot.Llama(text_model, hot_experts=2, slot_device="host", routing_profile=path, **LLAMA_KW)
    policy = DecayedFrequency(layout.n_moe_layers, layout.n_expert, 2, half_life=64)
    llm.hot_cache.use_policy(policy)
    assert policy.prior.sum() > 0
    np.testing.assert_allclose(policy.prior.sum(axis=1), PRIOR_WEIGHT * layout.n_expert_used / (1 - 0.5 ** (1 / 64)))
    llm.close()


def test_profile_is_saved_when_an_application_exits_without_closing(text_model, tmp_path):
    path = tmp_path / "p.npz"
    script = (f"import llamahot\nllm = llamahot.Llama({text_model!r}, hot_experts=1, slot_device='host', "
              f"routing_profile={str(path)!r}, n_ctx=256, verbose=False)\nllm.eval(llm.tokenize({PROMPT!r}))\n"
              f"print(int(llm.hot_cache.routing_history().sum()))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert load_profile(path, read_moe_layout(text_model)).counts.sum() == int(out.stdout.split()[-1]) > 0
    # A Llama that observed nothing does not write (a failed load leaves no empty profile behind).
    other = tmp_path / "none.npz"
    llamahot.Llama(text_model, hot_experts=1, slot_device="host", routing_profile=other, **LLAMA_KW).close()
    assert not other.exists()


def test_bad_profiles_are_refused_with_what_to_do(all_moe_models, tmp_path):
    qwen, deepseek = all_moe_models["qwen3moe-tiny"], all_moe_models["deepseek2-tiny"]
    path = tmp_path / "p.npz"
    record_profile(qwen, [TEXT[:2000]], path, window=128, slot_device="host", n_threads=2, n_threads_batch=2)
    saved = path.read_bytes()
    with pytest.raises(ValueError, match=r"recorded on a qwen3moe model .* delete .*p\.npz or pass another routing_profile"):
        llamahot.Llama(deepseek, hot_experts=1, slot_device="host", routing_profile=path, **LLAMA_KW)
    assert path.read_bytes() == saved, "a refused profile is left as it was"
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a profile")
    with pytest.raises(ValueError, match="is not a llamahot routing profile.*delete"):
        llamahot.Llama(qwen, hot_experts=1, slot_device="host", routing_profile=junk, **LLAMA_KW)
    assert junk.read_bytes() == b"not a profile"
    layout = read_moe_layout(qwen)
    with np.load(path) as data:
        meta, blocks = json.loads(str(data["meta"])), data["blocks"]
    for name, counts, meta_change in [("negative", -np.ones((len(blocks), layout.n_expert)), {}),
                                      ("future", np.ones((len(blocks), layout.n_expert)), {"format": 99})]:
        bad = tmp_path / f"{name}.npz"
        np.savez(bad, counts=counts, blocks=blocks, meta=np.array(json.dumps({**meta, **meta_change})))
        with pytest.raises(ValueError, match="damaged|format 99"):
            load_profile(bad, layout)
    # Same shape, another file: used, with a warning.
    renamed = tmp_path / "renamed.npz"
    np.savez(renamed, counts=np.ones((len(blocks), layout.n_expert)), blocks=blocks,
             meta=np.array(json.dumps({**meta, "model": "other.gguf"})))
    with pytest.warns(UserWarning, match="recorded on other.gguf"):
        assert load_profile(renamed, layout).tokens.all()


def test_a_failed_save_warns_at_close_and_keeps_the_old_file(text_model, tmp_path, monkeypatch):
    path = tmp_path / "p.npz"
    record_profile(text_model, [TEXT[:2000]], path, window=128, slot_device="host", n_threads=2, n_threads_batch=2)
    saved = path.read_bytes()
    llm = llamahot.Llama(text_model, hot_experts=1, slot_device="host", routing_profile=path, **LLAMA_KW)
    llm.eval(llm.tokenize(PROMPT))

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("llamahot.profile.os.replace", disk_full)
    with pytest.warns(UserWarning, match="could not save the routing profile .*No space left"):
        llm.close()
    assert path.read_bytes() == saved and sorted(os.listdir(tmp_path)) == ["p.npz"], "no temporary file left"
    with pytest.raises(ValueError, match="routing_profile needs hot_experts"):
        llamahot.Llama(text_model, routing_profile=path, **LLAMA_KW)
    with pytest.raises(ValueError, match="no routing profile path"):
        llamahot.Llama(text_model, hot_experts=1, slot_device="host", **LLAMA_KW).save_routing_profile()


def test_cli_profile_records_and_says_how_to_use_it(text_model, tmp_path):
    text = tmp_path / "code.py"
    text.write_bytes(TEXT)
    out = tmp_path / "p.npz"
    from llamahot.__main__ import main
    assert main(["profile", text_model, str(text), str(out), "--window", "128", "--slot-device", "host"]) == 0
    assert load_profile(out, read_moe_layout(text_model)).tokens.min() > 0
    assert main(["profile", text_model, str(tmp_path / "missing.txt"), str(out)]) == 2
