"""Python cost of one HotCache.rebalance, piece by piece, on the calibrated routing trace (CPU only).

Replays benchmarks/results/policies-qwen3moe-30b-a3b-routed.trace.npz (routing of 2048 tokens over
Qwen3-30B-A3B's 48 MoE layers x 128 experts) through a real llamahot.Llama: a synthetic model with
that layout and tiny experts (n_embd 256, experts 32 wide, Q8_0; written to --models once) with K
slots per layer on slot_device="emulated-gpu", the test-only kind that takes the CUDA path's
asynchronous-copy code (_HostCopies). Nothing is decoded: per rebalance the script adds the
interval's routing to the shim's counters and clock (what the shim's callback does during a decode),
calls HotCache.rebalance() as after_eval does, then lets the emulated copies land (what the next
decode's fence waits do; not timed).

Two passes over the trace, same decisions: the first times HotCache.rebalance() whole, the second
times its pieces (policy.observe, SlotManager.resident, policy.choose, SlotManager.plan,
SlotManager.load) through wrappers. Medians per rebalance, the first rebalance (the fill of every
slot) left out. "digests" hash the slots after every rebalance of the replay (so every plan) and
every hot set the policy chose: they must not change with the code.
Last, the per-load calls into the shim that load() makes (lh_slot_unpublish, lh_slot_publish,
lh_set_fence per changed layer), timed alone and priced at the median counts.

    .venv/bin/python benchmarks/rebalance_cost.py [--k 51] [--interval 4] [--policy decayed] [--passes 3]
        [--models /tmp/models] [--out FILE.json]

(~10 s on the 2-core dev box, plus ~1 s to write the model the first time.) To time another version
of the code with the same script, put that version first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path

import llamahot  # before numpy (see benchmarks/gpu/split_cost.py)
from llamahot import synth
from llamahot._shim import ffi, lib
from llamahot.policy import make_policy

import numpy as np

TRACE = Path(__file__).parent / "results" / "policies-qwen3moe-30b-a3b-routed.trace.npz"
PIECES = ("observe", "resident", "choose", "plan", "load")


def layout_model(folder: Path) -> Path:
    """Qwen3-30B-A3B's MoE layout (48 layers x 128 experts, 8 used) with small tensors: the Python
    cost of a rebalance depends on the layout, not on the experts' size."""
    path = folder / "qwen3moe-30b-a3b-layout-e256-ff32.gguf"
    if not path.exists():
        spec = dataclasses.replace(synth.PRESETS["qwen3moe-30b-a3b"], name=path.stem, n_embd=256, n_head=4,
                                   n_head_kv=2, head_dim=64, n_ff=256, n_ff_exp=32, expert_qtype=synth.QType.Q8_0,
                                   dense_qtype=synth.QType.Q8_0, context_length=256)
        folder.mkdir(parents=True, exist_ok=True)
        synth.synth_model(path, spec)
    return path


class Timers:
    """Wraps methods of an instance so each call's seconds are appended to samples[name]."""

    def __init__(self):
        self.samples = {name: [] for name in PIECES}
        self.chosen = hashlib.sha256()   # every hot set the policy chose (hashed after its call is timed)

    def wrap(self, obj, method: str, name: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = inner(*args, **kwargs)
            self.samples[name].append(time.perf_counter() - start)
            if name == "choose":
                self.chosen.update(np.packbits(result).tobytes())
            return result
        setattr(obj, method, timed)


def replay(llm, trace: np.ndarray, k: int, interval: int, timers: Timers | None) -> dict:
    """One pass over the trace from empty slots and a fresh policy; returns per-rebalance samples."""
    cache = llm.hot_cache
    cache.set_hot_experts(k)   # empty slots (copies landed, fences dropped); the next rebalance fills them
    cache.policy = make_policy(cache.policy_name, *trace.shape[1:], k, interval)
    cache._seen[:] = cache._counts
    cache._last_routed[:] = 0
    slots = cache.slots
    if timers is not None:
        timers.wrap(cache.policy, "observe", "observe")
        timers.wrap(slots, "resident", "resident")
        timers.wrap(cache.policy, "choose", "choose")
        timers.wrap(slots, "plan", "plan")
        timers.wrap(slots, "load", "load")
    whole, n_loads, n_layers_changed, digest = [], [], [], hashlib.sha256()
    for start in range(0, len(trace), interval):
        chunk = trace[start:start + interval]
        cache._counts += chunk.sum(axis=0)            # what the shim's callback counts during the evals
        for t in range(len(chunk)):
            cache._last_routed[chunk[t] > 0] = start + t + 1
        cache._tokens_since_rebalance = len(chunk)
        before = slots.expert_of_slot.copy()
        t0 = time.perf_counter()
        cache.rebalance()
        whole.append(time.perf_counter() - t0)
        slots.copies.close()                          # the next decode's fence waits: copies land
        # A plan loads each slot at most once, with an expert not resident: the slots that changed are the plan.
        changed = slots.expert_of_slot != before
        n_loads.append(int(changed.sum()))
        n_layers_changed.append(int(changed.any(axis=1).sum()))
        digest.update(slots.expert_of_slot.tobytes())
    # The first rebalance fills every slot: not a typical one.
    return {"whole": whole[1:], "loads": n_loads[1:], "layers": n_layers_changed[1:],
            "digest": digest.hexdigest()[:16] + ("/" + timers.chosen.hexdigest()[:16] if timers else ""),
            **({name: v[1:] for name, v in timers.samples.items()} if timers else {})}


def shim_call_costs(llm, reps: int = 20000) -> dict[str, float]:
    """Seconds per call of what load() calls into the shim per load and per changed layer, made as
    load() makes them (with SlotManager._check). Leaves the slots as they were."""
    slots, ctx = llm.hot_cache.slots, llm.hot_cache._ctx
    layer, slot = 0, 0
    expert = int(slots.expert_of_slot[layer, slot])
    assert expert >= 0
    check = slots._check
    start = time.perf_counter()
    for _ in range(reps):   # a pair: unpublish then publish the same expert again (state unchanged)
        check(lib.lh_slot_unpublish(ctx, layer, slot))
        check(lib.lh_slot_publish(ctx, layer, slot, expert))
    pair = (time.perf_counter() - start) / reps
    start = time.perf_counter()
    for _ in range(reps):   # the copies landed (replay closed them): a NULL fence is nothing to wait for
        check(lib.lh_set_fence(ctx, layer, ffi.cast("void *", 0)))
    fence = (time.perf_counter() - start) / reps
    return {"unpublish+publish": pair, "set_fence": fence}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=51)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--passes", type=int, default=3, help="passes over the trace per measurement")
    parser.add_argument("--policy", default="decayed")
    parser.add_argument("--models", default="/tmp/models")
    parser.add_argument("--out", help="write the medians here (JSON)")
    args = parser.parse_args()
    trace = np.load(TRACE)["trace"].astype(np.int64)   # stored as uint8
    llm = llamahot.Llama(str(layout_model(Path(args.models))), hot_experts=args.k, slot_device="emulated-gpu",
                         rebalance_interval=args.interval, policy=args.policy, n_ctx=64, n_threads=1,
                         n_threads_batch=1, verbose=False)
    runs = {"whole": [], **{name: [] for name in PIECES}}
    loads, layers, digests = [], [], set()
    for _ in range(args.passes):   # interleaved: the machine drifts between passes
        untimed = replay(llm, trace, args.k, args.interval, None)
        pieces = replay(llm, trace, args.k, args.interval, Timers())
        runs["whole"] += untimed["whole"]
        for name in PIECES:
            runs[name] += pieces[name]
        loads += untimed["loads"]
        layers += untimed["layers"]
        assert pieces["digest"].startswith(untimed["digest"]), (untimed["digest"], pieces["digest"])
        digests.add(pieces["digest"])
    assert len(digests) == 1, digests
    median_us = {name: statistics.median(v) * 1e6 for name, v in runs.items()}
    calls = shim_call_costs(llm)
    n_loads, n_layers = statistics.median(loads), statistics.median(layers)
    shim_us = (n_loads * calls["unpublish+publish"] + n_layers * calls["set_fence"]) * 1e6
    llm.close()

    print(f"rebalance cost: K={args.k}, every {args.interval} tokens, policy {args.policy}, "
          f"{len(runs['whole'])} rebalances ({args.passes} passes, the fills left out); "
          f"median {n_loads:g} loads in {n_layers:g} layers; digests {digests.pop()}")
    print("| piece | median µs per rebalance |")
    print("|---|---:|")
    for name in PIECES:
        print(f"| {name} | {median_us[name]:.1f} |")
    print(f"| sum of pieces | {sum(median_us[n] for n in PIECES):.1f} |")
    print(f"| HotCache.rebalance (whole, unwrapped) | {median_us['whole']:.1f} |")
    print(f"per-load shim calls in load(): unpublish+publish {calls['unpublish+publish'] * 1e6:.2f} µs per load, "
          f"set_fence {calls['set_fence'] * 1e6:.2f} µs per layer: ~{shim_us:.1f} µs of load()'s "
          f"{median_us['load']:.1f} µs at the median counts")
    if args.out:
        Path(args.out).write_text(json.dumps({"k": args.k, "interval": args.interval, "policy": args.policy,
                                              "median_us": median_us, "median_loads": n_loads,
                                              "median_layers_changed": n_layers, "shim_call_s": calls,
                                              "shim_us_per_rebalance": shim_us}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
