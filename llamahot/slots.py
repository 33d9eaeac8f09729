"""Slots and transfers: turn a desired hot set into copies, and publish slots only once filled.

The shim owns the slot tensors and the published maps; this module decides which slot gets which
expert and moves the bytes. Host slots are filled with a synchronous copy inside the shim. CUDA
slots are filled with cuda-python `cudaMemcpyAsync` on a dedicated copy stream, one event per
rebalance; a slot is unpublished before its copy is issued and published when its event completed.
The emulated GPU of the tests takes the same asynchronous path, with memmove for the copies.
"""
from __future__ import annotations

import ctypes
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
    total_rebalance_ms: float = 0.0   # every rebalance's stall, summed
    pending: int = 0

    def reset_counters(self) -> None:
        self.bytes_moved = self.experts_loaded = self.rebalances = 0
        self.last_rebalance_ms = self.max_rebalance_ms = self.total_rebalance_ms = 0.0


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


class _HostCopies:
    """The emulated GPU's copies (tests): the same batches and publication as CUDA's, with memmove
    into the emulated device's host buffers. A batch counts as finished at the next `completed()`,
    like a DMA that is done by the next token, so the in-flight path runs in CI too."""

    def __init__(self):
        self.batches: list[list[tuple[int, int, int]]] = []

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def close_batch(self, publications: list[tuple[int, int, int]]) -> None:
        self.batches.append(publications)

    def completed(self) -> list[tuple[int, int, int]]:
        done = [p for batch in self.batches for p in batch]
        self.batches.clear()
        return done

    def close(self) -> None:
        self.batches.clear()


def plan_loads(desired: np.ndarray, expert_of_slot: np.ndarray, incoming: np.ndarray,
               resident: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The copies that make the slots hold `desired`, all layers at once: (layers, slots, experts).

    In each layer, the wanted newcomers (desired, not resident; in expert order) go into the free
    slots (empty, or holding an expert that `desired` drops; never one being filled; in slot order),
    as many as both allow.
    """
    n_layers, _ = expert_of_slot.shape
    rows = np.arange(n_layers)[:, None]
    wanted = desired & ~resident
    dropped = resident & ~desired
    held = expert_of_slot >= 0
    free = (incoming < 0) & (~held | dropped[rows, np.where(held, expert_of_slot, 0)])
    n = np.minimum(free.sum(axis=1), wanted.sum(axis=1))[:, None]
    # np.nonzero walks row by row, so the k-th free slot of a layer pairs with its k-th newcomer.
    layers, slots = np.nonzero(free & (np.cumsum(free, axis=1) <= n))
    _, experts = np.nonzero(wanted & (np.cumsum(wanted, axis=1) <= n))
    return layers, slots, experts


@dataclass
class SlotManager:
    """Keeps the shim's slots in line with a policy's desired hot set."""

    ctx: object
    kind: str                       # "host" | "cuda" | "emulated-gpu"
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
        self.copies = None
        if self.n_slots > 0 and self.kind in ("cuda", "emulated-gpu"):
            self.copies = _CudaCopies() if self.kind == "cuda" else _HostCopies()
        self._address_tables()

    def _address_tables(self) -> None:
        """Bytes of each layer's expert matrices and, with asynchronous copies, where each expert's
        and each slot's matrices live, read once: a rebalance then only indexes arrays (calls into
        the shim per copy cost more than issuing the copies)."""
        n_proj = len(self.projections)
        self.nbytes = np.zeros((self.n_layers, n_proj), dtype=np.uint64)
        pointer, nbytes = ffi.new("void **"), ffi.new("size_t *")
        for layer in range(self.n_layers):
            for i, proj in enumerate(self.projections):
                self._check(lib.lh_expert_slab(self.ctx, layer, proj, 0, pointer, nbytes))
                self.nbytes[layer, i] = nbytes[0]
        if self.copies is None:
            return
        self.src = np.zeros((self.n_layers, n_proj, self.n_expert), dtype=np.uint64)
        self.dst = np.zeros((self.n_layers, n_proj, self.n_slots), dtype=np.uint64)
        for layer in range(self.n_layers):
            for i, proj in enumerate(self.projections):
                for expert in range(self.n_expert):
                    self._check(lib.lh_expert_slab(self.ctx, layer, proj, expert, pointer, nbytes))
                    self.src[layer, i, expert] = int(ffi.cast("uintptr_t", pointer[0]))
                for slot in range(self.n_slots):
                    self._check(lib.lh_slot_slab(self.ctx, layer, proj, slot, pointer, nbytes))
                    self.dst[layer, i, slot] = int(ffi.cast("uintptr_t", pointer[0]))
                    if nbytes[0] != self.nbytes[layer, i]:
                        raise RuntimeError(f"llamahot: slot {slot} of layer {layer} holds {nbytes[0]} bytes per "
                                           f"matrix, its experts {int(self.nbytes[layer, i])}")

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
        layers, slots, experts = plan_loads(desired, self.expert_of_slot, self.incoming, self.resident())
        loads = list(zip(layers.tolist(), slots.tolist(), experts.tolist()))
        for layer, slot, _ in loads:
            self._check(lib.lh_slot_unpublish(self.ctx, layer, slot))
        if self.copies is None:  # host slots: a synchronous copy in the shim, published at once
            for layer, slot, expert in loads:
                self._check(lib.lh_slot_load(self.ctx, layer, slot, expert))
                self._check(lib.lh_slot_publish(self.ctx, layer, slot, expert))
        elif loads:
            # Every matrix of every load: [n_proj, n_loads] addresses, then one copy call each.
            src = self.src[layers, :, experts].T
            dst = self.dst[layers, :, slots].T
            nbytes = np.broadcast_to(self.nbytes[layers].T, src.shape)
            for d, s, nb in zip(dst.ravel().tolist(), src.ravel().tolist(), nbytes.ravel().tolist()):
                self.copies.copy(d, s, nb)
            self.copies.close_batch(loads)
            self.incoming[layers, slots] = experts
        self.stats.bytes_moved += int(self.nbytes[layers].sum())
        self.stats.experts_loaded += len(loads)
        self.stats.rebalances += 1
        self.stats.last_rebalance_ms = (time.perf_counter() - start) * 1e3
        self.stats.max_rebalance_ms = max(self.stats.max_rebalance_ms, self.stats.last_rebalance_ms)
        self.stats.pending = int((self.incoming >= 0).sum())

    def publish_completed(self) -> None:
        """Publish slots whose copies finished (CUDA); cheap, never waits."""
        if self.copies is None:
            return
        for layer, slot, expert in self.copies.completed():
            self.incoming[layer, slot] = -1
            self._check(lib.lh_slot_publish(self.ctx, layer, slot, expert))
        self.stats.pending = int((self.incoming >= 0).sum())

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"llamahot: {ffi.string(lib.lh_last_error(self.ctx)).decode()}")

    def close(self) -> None:
        if self.copies is not None:
            self.copies.close()
            self.copies = None
