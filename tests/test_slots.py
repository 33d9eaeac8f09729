"""plan_loads: which copies turn the slots into a policy's desired hot set (all layers at once); the
resident mask the slot manager reads from the shim."""
from __future__ import annotations

import numpy as np
import pytest

import llamahot
from llamahot.slots import plan_loads

from conftest import LLAMA_KW


def plan_one_layer_at_a_time(desired, expert_of_slot, resident):
    """The rule written out per layer: newcomers in expert order into free slots in slot order."""
    loads = []
    for layer in range(len(desired)):
        dropped = set(np.flatnonzero(resident[layer] & ~desired[layer]).tolist())
        free = [s for s in range(expert_of_slot.shape[1])
                if expert_of_slot[layer, s] < 0 or expert_of_slot[layer, s] in dropped]
        newcomers = np.flatnonzero(desired[layer] & ~resident[layer]).tolist()
        loads += [(layer, slot, expert) for slot, expert in zip(free, newcomers)]
    return loads


@pytest.mark.parametrize("seed", range(20))
def test_plan_loads_matches_the_per_layer_rule(seed):
    rng = np.random.default_rng(seed)
    n_layers, n_expert = int(rng.integers(1, 6)), int(rng.integers(2, 40))
    k = int(rng.integers(1, n_expert + 1))
    # Slots: holding an expert or empty; an expert is in at most one slot.
    expert_of_slot = np.full((n_layers, k), -1, np.int32)
    for layer in range(n_layers):
        experts = rng.permutation(n_expert)[:k]
        held = rng.random(k) < 0.7
        expert_of_slot[layer, held] = experts[held]
    resident = np.zeros((n_layers, n_expert), bool)
    layers, slots = np.nonzero(expert_of_slot >= 0)
    resident[layers, expert_of_slot[layers, slots]] = True
    desired = np.zeros_like(resident)
    for layer in range(n_layers):
        desired[layer, rng.permutation(n_expert)[: int(rng.integers(0, k + 1))]] = True

    layers, slots, experts = plan_loads(desired, expert_of_slot, resident)
    got = list(zip(layers.tolist(), slots.tolist(), experts.tolist()))
    assert got == plan_one_layer_at_a_time(desired, expert_of_slot, resident)
    assert len(set((l, e) for l, _, e in got)) == len(got) and not resident[layers, experts].any()


def test_plan_loads_without_changes_copies_nothing():
    expert_of_slot = np.array([[3, 1, -1]], np.int32)
    resident = np.zeros((1, 5), bool)
    resident[0, [3, 1]] = True
    layers, slots, experts = plan_loads(resident.copy(), expert_of_slot, resident)
    assert layers.size == slots.size == experts.size == 0


@pytest.mark.parametrize("slot_device", ["host", "emulated-gpu"])
def test_resident_mask_follows_the_slots(text_model, slot_device):
    """SlotManager.resident() reads the shim's expert -> slot map: after every rebalance (and a
    resize) it is the mask of the experts in expert_of_slot."""
    llm = llamahot.Llama(text_model, hot_experts=3, rebalance_interval=1, slot_device=slot_device, **LLAMA_KW)
    cache = llm.hot_cache

    def mask_of_slots():
        slots = cache.slots
        mask = np.zeros((slots.n_layers, slots.n_expert), bool)
        layers, index = np.nonzero(slots.expert_of_slot >= 0)
        mask[layers, slots.expert_of_slot[layers, index]] = True
        return mask

    llm.eval(llm.tokenize(b"def f(x):\n"))
    for step, token in enumerate([42, 7, 99, 13, 5, 61]):
        if step == 3:
            cache.set_hot_experts(2)
        llm.eval([token])
        assert cache.slots.occupied() > 0
        np.testing.assert_array_equal(cache.slots.resident(), mask_of_slots())
    llm.close()


def test_cuda_errors_say_what_failed_and_what_to_do():
    """One check for every cuda-python call of the slot copies, the page moves and the VRAM query."""
    cudart = pytest.importorskip("cuda.bindings.runtime")
    from llamahot.slots import check_cuda

    check_cuda(cudart, cudart.cudaError_t.cudaSuccess, "cudaMemAdvise")
    with pytest.raises(RuntimeError, match="cudaMemAdvise failed: the installed cuda-python is newer than"):
        check_cuda(cudart, cudart.cudaError_t.cudaErrorInsufficientDriver, "cudaMemAdvise")
    with pytest.raises(RuntimeError, match="cudaMemGetInfo failed: .*InvalidValue"):
        check_cuda(cudart, cudart.cudaError_t.cudaErrorInvalidValue, "cudaMemGetInfo")
