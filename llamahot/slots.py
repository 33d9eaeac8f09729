"""Slots and transfers: turn a desired hot set into copies; a slot serves only once its copy landed.

The shim owns the slot tensors and the published maps; this module decides which slot gets which
expert and moves the bytes. Host slots are filled with a synchronous copy inside the shim. CUDA
slots are filled with cuda-python (`cudaMemcpyBatchAsync`, else `cudaMemcpyAsync`) on a dedicated copy
stream: a slot is unpublished before its copy is issued and published right after, with a fence for
its layer (a CUDA event) that the shim waits for before it next reads that layer's slots. The
emulated GPU of the tests takes the same path, its copies landing only when the shim waits.
"""
from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass, field

import numpy as np

from llamahot._shim import ffi, lib
from llamahot.policy import rank_in_layer


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


def layer_groups(n_layers: int) -> np.ndarray:
    """Group of each layer for copies: 0, 1-2, 3-6, 7-14, ... (sizes 1, 2, 4, 8, ...). A group's
    copies are issued together and share one fence: few calls into CUDA per rebalance, while the
    first layers, whose stops come first in a token, wait only for small groups."""
    return np.floor(np.log2(np.arange(n_layers) + 1)).astype(np.int64)


class _CudaCopies:
    """Asynchronous host->device copies on a dedicated stream, issued per group of layers (one
    cudaMemcpyBatchAsync each where the CUDA runtime has it, else a cudaMemcpyAsync per matrix; on the
    H100 the batch saved ~2 us per copy, 0.1 ms per token at the default). After a group's copies an
    event of that group is recorded: the fence the shim waits for (the driver's cuEventSynchronize)
    before it next reads the slots of the group's layers, so a slot serves from the first stop after
    its copy landed."""

    def __init__(self, n_groups: int):
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
        self.events, self.handles = [], []
        for _ in range(n_groups):
            err, event = cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming)
            self._check(err, "cudaEventCreateWithFlags")
            self.events.append(event)
            self.handles.append(ctypes.c_void_p.from_address(event.getPtr()).value)  # the cudaEvent_t itself
        # CUDA events are driver events (cudaEvent_t is CUevent), so the shim can wait with the driver.
        driver = ctypes.CDLL("libcuda.so.1")
        self.waiter = ffi.cast("int32_t (*)(void *)", ctypes.cast(driver.cuEventSynchronize, ctypes.c_void_p).value)
        self.batch = hasattr(cudart, "cudaMemcpyBatchAsync")   # False: one cudaMemcpyAsync per matrix
        if self.batch:
            self.attrs = cudart.cudaMemcpyAttributes()
            self.attrs.srcAccessOrder = cudart.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
        self.last_fence = None   # the latest event recorded; once it completed, every copy did
        self.loads_in_flight = 0

    def _check(self, err, what: str) -> None:
        if err == self.rt.cudaError_t.cudaErrorInsufficientDriver:
            raise RuntimeError(
                f"llamahot: {what} failed: the installed cuda-python is newer than this machine's CUDA "
                "driver. Install the cuda-python of your CUDA major version, e.g. "
                "`pip install \"cuda-python<13\"` for CUDA 12."
            )
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"llamahot: {what} failed: {err}")

    def issue(self, group: int, dsts: list[int], srcs: list[int], sizes: list[int], n_loads: int) -> int:
        """Copy srcs to dsts (host to device), then record the group's event; returns it (the fence)."""
        if self.batch:
            err = self.rt.cudaMemcpyBatchAsync(dsts, srcs, sizes, len(sizes), [self.attrs], [0], 1, self.stream)[0]
            if err != self.rt.cudaError_t.cudaSuccess:  # not enqueued: the copies go one by one from now on
                self.batch = False
        if not self.batch:
            for dst, src, nbytes in zip(dsts, srcs, sizes):
                (err,) = self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                                 self.stream)
                self._check(err, "cudaMemcpyAsync")
        event = self.events[group]
        (err,) = self.rt.cudaEventRecord(event, self.stream)
        self._check(err, "cudaEventRecord")
        self.loads_in_flight = self.in_flight() + n_loads
        self.last_fence = event
        return self.handles[group]

    def in_flight(self) -> int:
        """Loads whose copies may still be running (0 once the last fence completed); never waits."""
        if self.last_fence is not None and self.rt.cudaEventQuery(self.last_fence)[0] != \
                self.rt.cudaError_t.cudaErrorNotReady:
            self.last_fence, self.loads_in_flight = None, 0
        return self.loads_in_flight

    def close(self) -> None:
        self.rt.cudaStreamSynchronize(self.stream)
        for event in self.events:
            self.rt.cudaEventDestroy(event)
        self.events.clear()
        self.rt.cudaStreamDestroy(self.stream)


class _HostCopies:
    """The emulated GPU's copies (tests): the CUDA path's groups and fences, with memmove into the
    emulated device's host buffers. A copy lands only when the shim waits for its group's fence (or
    at close): a slot read before its wait would hold another expert's bytes, and the logits show it."""

    def __init__(self, n_groups: int):
        self.queued: list[list[tuple[int, int, int]]] = [[] for _ in range(n_groups)]  # per group, in issue order
        self.queued_loads = [0] * n_groups
        self.waits = 0
        self.waiter = ffi.callback("int32_t (*)(void *)", self._wait)

    def _wait(self, fence) -> int:
        group = int(ffi.cast("uintptr_t", fence)) - 1
        for dst, src, nbytes in self.queued[group]:
            ctypes.memmove(dst, src, nbytes)
        self.queued[group].clear()
        self.queued_loads[group] = 0
        self.waits += 1
        return 0

    def issue(self, group: int, dsts: list[int], srcs: list[int], sizes: list[int], n_loads: int) -> int:
        self.queued[group] += zip(dsts, srcs, sizes)
        self.queued_loads[group] += n_loads
        return group + 1   # any non-NULL value names the group

    def in_flight(self) -> int:
        return sum(self.queued_loads)

    def close(self) -> None:
        for group in range(len(self.queued)):
            self._wait(ffi.cast("void *", group + 1))


def plan_loads(desired: np.ndarray, expert_of_slot: np.ndarray,
               resident: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The copies that make the slots hold `desired`, all layers at once: (layers, slots, experts),
    layer by layer.

    In each layer, the wanted newcomers (desired, not resident; in expert order) go into the free
    slots (empty, or holding an expert that `desired` drops; in slot order), as many as both allow.
    Both are flat indices of their (few) True entries: np.nonzero of a 2-D mask costs 5x more.
    """
    n_layers, n_slots = expert_of_slot.shape
    n_expert = desired.shape[1]
    dropped = resident & ~desired
    layer_start = np.arange(0, n_layers * n_expert, n_expert)[:, None]
    holds_dropped = dropped.take(layer_start + np.maximum(expert_of_slot, 0))
    new_layer, experts = np.divmod(np.flatnonzero(desired & ~resident), n_expert)
    free_layer, slots = np.divmod(np.flatnonzero((expert_of_slot < 0) | holds_dropped), n_slots)
    # The k-th free slot of a layer takes its k-th newcomer, as many as both allow.
    n = np.minimum(np.bincount(new_layer, minlength=n_layers), np.bincount(free_layer, minlength=n_layers))
    use = rank_in_layer(free_layer) < n[free_layer]
    return free_layer[use], slots[use], experts[rank_in_layer(new_layer) < n[new_layer]]


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
        # Its inverse, kept by the shim with it (-1: in no slot): resident() in one comparison.
        self.slot_of_expert = np.frombuffer(ffi.buffer(lib.lh_slot_of_expert(self.ctx), self.n_layers * self.n_expert * 4),
                                            dtype=np.int32).reshape(self.n_layers, self.n_expert)
        self.copies = None
        self.group_of_layer = layer_groups(self.n_layers)
        self._group_of_layer = self.group_of_layer.tolist()   # for load(), per load
        if self.n_slots > 0 and self.kind in ("cuda", "emulated-gpu"):
            n_groups = int(self.group_of_layer[-1]) + 1
            self.use_copies(_CudaCopies(n_groups) if self.kind == "cuda" else _HostCopies(n_groups))
        self._address_tables()

    def use_copies(self, copies) -> None:
        """Asynchronous loads through `copies` (issue, in_flight, close; its `waiter` is what the
        shim calls with a layer's fence before reading the layer's slots)."""
        self.copies = copies
        lib.lh_set_fence_waiter(self.ctx, copies.waiter)

    def _address_tables(self) -> None:
        """Bytes of each layer's expert matrices and, with asynchronous copies, where each expert's
        and each slot's matrices live, read once: a rebalance then only indexes arrays (calls into
        the shim per copy cost more than issuing the copies)."""
        n_proj = len(self.projections)
        self.nbytes = np.zeros((self.n_layers, n_proj), dtype=np.uint64)
        if self.copies is not None:
            self.src = np.zeros((self.n_layers, n_proj, self.n_expert), dtype=np.uint64)
            self.dst = np.zeros((self.n_layers, n_proj, self.n_slots), dtype=np.uint64)
        for layer in range(self.n_layers):
            for i, proj in enumerate(self.projections):
                self.nbytes[layer, i], src = self._slabs(lib.lh_expert_slab, layer, proj, self.n_expert)
                if self.copies is not None:
                    self.src[layer, i] = src
                    nbytes, self.dst[layer, i] = self._slabs(lib.lh_slot_slab, layer, proj, self.n_slots)
                    if nbytes != self.nbytes[layer, i]:
                        raise RuntimeError(f"llamahot: the slots of layer {layer} hold {nbytes} bytes per matrix, "
                                           f"its experts {int(self.nbytes[layer, i])}")

    def _slabs(self, slab, layer: int, proj: int, count: int) -> tuple[int, np.ndarray]:
        """(bytes, addresses) of a projection's `count` expert or slot matrices, which lie one after
        the other (checked at the last one): two calls into the shim instead of one per matrix."""
        pointer, nbytes = ffi.new("void **"), ffi.new("size_t *")
        addresses = []
        for index in (0, count - 1):
            self._check(slab(self.ctx, layer, proj, index, pointer, nbytes))
            addresses.append(int(ffi.cast("uintptr_t", pointer[0])))
        if addresses[1] != addresses[0] + (count - 1) * nbytes[0]:
            raise RuntimeError(f"llamahot: the matrices of layer {layer}, projection {proj} are not contiguous")
        return nbytes[0], addresses[0] + np.arange(count, dtype=np.uint64) * np.uint64(nbytes[0])

    def resident(self) -> np.ndarray:
        """bool [n_layers, n_expert]: experts in a slot (published; with asynchronous copies
        possibly still landing)."""
        return self.slot_of_expert >= 0

    def occupied(self) -> int:
        return int((self.expert_of_slot >= 0).sum())

    def plan(self, desired: np.ndarray, resident: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The loads (layers, slots, experts) that make the slots hold `desired`, given `resident` (this
        manager's resident(), as the policy saw it); changes nothing."""
        if self.n_slots == 0:
            return (np.zeros(0, dtype=np.int64),) * 3
        return plan_loads(desired, self.expert_of_slot, resident)

    def load(self, layers: np.ndarray, slots: np.ndarray, experts: np.ndarray) -> None:
        """Put each expert into its slot (a plan of the current slots); returns without waiting.

        Host slots: each copy is made now, then its slot published. Asynchronous copies: a slot is
        published as soon as its copy is issued, and its layer gets a fence the shim waits for
        before next reading that layer's slots (copies run while the GPU and CPU decode)."""
        if self.n_slots == 0:
            return
        ctx, check = self.ctx, self._check
        layer_list, slot_list, expert_list = layers.tolist(), slots.tolist(), experts.tolist()
        for layer, slot in zip(layer_list, slot_list):
            check(lib.lh_slot_unpublish(ctx, layer, slot))
        nbytes = self.nbytes[layers].ravel().tolist()   # per load, its matrices' sizes ([n_loads, n_proj])
        if self.copies is None:
            for layer, slot, expert in zip(layer_list, slot_list, expert_list):
                check(lib.lh_slot_load(ctx, layer, slot, expert))
        elif layer_list:
            # Per load, its matrices' addresses; issued group by group (the loads come in layer order,
            # so each group's are one run), each group's fence set on its layers.
            src = self.src[layers, :, experts].ravel().tolist()
            dst = self.dst[layers, :, slots].ravel().tolist()
            n_proj, begin = len(self.projections), 0
            for group, run in itertools.groupby(layer_list, self._group_of_layer.__getitem__):
                run = list(run)
                end = begin + len(run)
                cut = slice(begin * n_proj, end * n_proj)
                fence = ffi.cast("void *", self.copies.issue(group, dst[cut], src[cut], nbytes[cut], len(run)))
                for layer in sorted(set(run)):
                    check(lib.lh_set_fence(ctx, layer, fence))
                begin = end
        for layer, slot, expert in zip(layer_list, slot_list, expert_list):
            check(lib.lh_slot_publish(ctx, layer, slot, expert))
        self.stats.bytes_moved += sum(nbytes)
        self.stats.experts_loaded += len(layer_list)
        self.stats.rebalances += 1   # its stall is timed by the caller (HotCache.rebalance), policy included
        self.update_pending()

    def update_pending(self) -> None:
        """stats.pending: loads whose copies may still be landing (cheap, never waits)."""
        self.stats.pending = self.copies.in_flight() if self.copies is not None else 0

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"llamahot: {ffi.string(lib.lh_last_error(self.ctx)).decode()}")

    def close(self) -> None:
        """Wait for the copies in flight and drop the fences (their events go with the copies)."""
        if self.copies is not None:
            self.copies.close()
            for layer in range(self.n_layers):
                lib.lh_set_fence(self.ctx, layer, ffi.NULL)
            lib.lh_set_fence_waiter(self.ctx, ffi.NULL)
            self.copies = None
