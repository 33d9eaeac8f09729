"""Slots and transfers: turn a desired hot set into copies, and publish slots only once filled.

The shim owns the slot tensors and the published maps; this module decides which slot gets which
expert and moves the bytes. Host slots are filled with a synchronous copy inside the shim. CUDA
slots are filled with cuda-python `cudaMemcpyAsync` on a dedicated copy stream, one event per
rebalance; a slot is unpublished before its copy is issued and published when its event completed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from llamahot._shim import ffi, lib


# VRAM left free besides the slots: the shim's compact graphs, GPU copies of expert biases, and
# room for llama.cpp's own buffers to grow.
VRAM_RESERVE = 512 * 2**20


def largest_k_that_fits(free_bytes: int, slot_bytes_per_expert: int, n_layers: int, n_expert: int,
                        reserve: int = VRAM_RESERVE) -> int:
    """The most slots per layer that fit in `free_bytes` of VRAM, keeping `reserve` free."""
    per_k = slot_bytes_per_expert * n_layers
    return max(0, min(n_expert, (free_bytes - reserve) // per_k)) if per_k else n_expert


def check_vram_for_slots(k: int, free_bytes: int, slot_bytes_per_expert: int, n_layers: int, n_expert: int,
                         reserve: int = VRAM_RESERVE) -> None:
    """Raise ValueError naming the largest K that fits when K slots per layer do not fit."""
    need = k * slot_bytes_per_expert * n_layers
    if need + reserve <= free_bytes:
        return
    fits = largest_k_that_fits(free_bytes, slot_bytes_per_expert, n_layers, n_expert, reserve)
    raise ValueError(
        f"hot_experts={k} needs {need / 2**30:.2f} GiB of VRAM for its slots ({k} x "
        f"{slot_bytes_per_expert / 2**20:.2f} MiB per expert x {n_layers} layers) plus "
        f"{reserve / 2**30:.2f} GiB of headroom, but only {free_bytes / 2**30:.2f} GiB is free after loading "
        f"the model. The largest hot_experts that fits is {fits}."
    )


def free_vram_bytes() -> int:
    """Free memory of the current CUDA device, as the CUDA runtime reports it."""
    from cuda.bindings import runtime as cudart

    err, free, _total = cudart.cudaMemGetInfo()
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"llamahot: cudaMemGetInfo failed: {err}")
    return int(free)


@dataclass
class TransferStats:
    bytes_moved: int = 0
    experts_loaded: int = 0
    rebalances: int = 0
    last_rebalance_ms: float = 0.0
    max_rebalance_ms: float = 0.0
    pending: int = 0

    def reset_counters(self) -> None:
        self.bytes_moved = self.experts_loaded = self.rebalances = 0
        self.last_rebalance_ms = self.max_rebalance_ms = 0.0


class _CudaCopies:
    """Asynchronous host->device copies on a dedicated stream, with one event per batch."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                "slot_device='cuda' moves experts with cuda-python; install it with `pip install cuda-python` "
                "matching your CUDA major version."
            ) from exc
        self.rt = cudart
        err, self.stream = cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)
        self._check(err, "cudaStreamCreateWithFlags")
        self.batches: list[tuple[object, list[tuple[int, int, int]]]] = []  # (event, [(layer, slot, expert)])

    def _check(self, err, what: str) -> None:
        if err == self.rt.cudaError_t.cudaErrorInsufficientDriver:
            raise RuntimeError(
                f"llamahot: {what} failed: the installed cuda-python is newer than this machine's CUDA "
                "driver. Install the cuda-python of your CUDA major version, e.g. "
                "`pip install \"cuda-python<13\"` for CUDA 12."
            )
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"llamahot: {what} failed: {err}")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        (err,) = self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream)
        self._check(err, "cudaMemcpyAsync")

    def close_batch(self, publications: list[tuple[int, int, int]]) -> None:
        err, event = self.rt.cudaEventCreateWithFlags(self.rt.cudaEventDisableTiming)
        self._check(err, "cudaEventCreateWithFlags")
        (err,) = self.rt.cudaEventRecord(event, self.stream)
        self._check(err, "cudaEventRecord")
        self.batches.append((event, publications))

    def completed(self) -> list[tuple[int, int, int]]:
        """Publications whose copies finished, in issue order; never waits."""
        done = []
        while self.batches:
            event, publications = self.batches[0]
            (err,) = self.rt.cudaEventQuery(event)
            if err == self.rt.cudaError_t.cudaErrorNotReady:
                break
            self._check(err, "cudaEventQuery")
            self.rt.cudaEventDestroy(event)
            self.batches.pop(0)
            done.extend(publications)
        return done

    def close(self) -> None:
        self.rt.cudaStreamSynchronize(self.stream)
        for event, _ in self.batches:
            self.rt.cudaEventDestroy(event)
        self.batches.clear()
        self.rt.cudaStreamDestroy(self.stream)


@dataclass
class SlotManager:
    """Keeps the shim's slots in line with a policy's desired hot set."""

    ctx: object
    kind: str                       # "host" | "cuda"
    n_layers: int
    n_expert: int
    n_slots: int
    projections: tuple[int, ...]
    stats: TransferStats = field(default_factory=TransferStats)

    def __post_init__(self):
        n = self.n_layers * max(self.n_slots, 1)
        self.expert_of_slot = np.frombuffer(ffi.buffer(lib.lh_expert_of_slot(self.ctx), n * 4), dtype=np.int32)
        self.expert_of_slot = self.expert_of_slot[: self.n_layers * self.n_slots].reshape(self.n_layers, self.n_slots)
        # Slots whose copy is in flight: not published yet, but no longer free.
        self.incoming = np.full((self.n_layers, self.n_slots), -1, dtype=np.int32)
        self.cuda = _CudaCopies() if self.kind == "cuda" and self.n_slots > 0 else None

    def resident(self) -> np.ndarray:
        """bool [n_layers, n_expert]: experts in a slot or on their way to one."""
        mask = np.zeros((self.n_layers, self.n_expert), dtype=bool)
        for occupant in (self.expert_of_slot, self.incoming):
            layers, slots = np.nonzero(occupant >= 0)
            mask[layers, occupant[layers, slots]] = True
        return mask

    def occupied(self) -> int:
        return int((self.expert_of_slot >= 0).sum())

    def apply(self, desired: np.ndarray) -> None:
        """Issue the copies that make the slots hold `desired`; returns without waiting for them."""
        if self.n_slots == 0:
            return
        start = time.perf_counter()
        self.publish_completed()
        resident = self.resident()
        loads: list[tuple[int, int, int]] = []
        for layer in np.flatnonzero((desired != resident).any(axis=1)):
            evict = set(np.flatnonzero(resident[layer] & ~desired[layer]).tolist())
            free = [s for s in range(self.n_slots)
                    if self.incoming[layer, s] < 0 and
                    (self.expert_of_slot[layer, s] < 0 or self.expert_of_slot[layer, s] in evict)]
            for slot, expert in zip(free, np.flatnonzero(desired[layer] & ~resident[layer]).tolist()):
                self._check(lib.lh_slot_unpublish(self.ctx, int(layer), slot))
                loads.append((int(layer), slot, expert))
        for layer, slot, expert in loads:
            self._load(layer, slot, expert)
        if self.cuda is not None and loads:
            self.cuda.close_batch(loads)
        self.stats.rebalances += 1
        self.stats.last_rebalance_ms = (time.perf_counter() - start) * 1e3
        self.stats.max_rebalance_ms = max(self.stats.max_rebalance_ms, self.stats.last_rebalance_ms)
        self.stats.pending = int((self.incoming >= 0).sum())

    def _load(self, layer: int, slot: int, expert: int) -> None:
        src, dst, nbytes = ffi.new("void **"), ffi.new("void **"), ffi.new("size_t *")
        for proj in self.projections:
            self._check(lib.lh_expert_slab(self.ctx, layer, proj, expert, src, nbytes))
            self.stats.bytes_moved += nbytes[0]
            if self.cuda is not None:
                self._check(lib.lh_slot_slab(self.ctx, layer, proj, slot, dst, nbytes))
                self.cuda.copy(int(ffi.cast("uintptr_t", dst[0])), int(ffi.cast("uintptr_t", src[0])), nbytes[0])
        if self.cuda is None:
            self._check(lib.lh_slot_load(self.ctx, layer, slot, expert))
            self._check(lib.lh_slot_publish(self.ctx, layer, slot, expert))
        else:
            self.incoming[layer, slot] = expert
        self.stats.experts_loaded += 1

    def publish_completed(self) -> None:
        """Publish slots whose copies finished (CUDA); cheap, never waits."""
        if self.cuda is None:
            return
        for layer, slot, expert in self.cuda.completed():
            self.incoming[layer, slot] = -1
            self._check(lib.lh_slot_publish(self.ctx, layer, slot, expert))
        self.stats.pending = int((self.incoming >= 0).sum())

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"llamahot: {ffi.string(lib.lh_last_error(self.ctx)).decode()}")

    def close(self) -> None:
        if self.cuda is not None:
            self.cuda.close()
            self.cuda = None
