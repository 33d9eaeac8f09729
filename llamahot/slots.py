"""Slots and transfers: turn a desired hot set into copies; a slot serves only once its copy landed.

The shim owns the slot tensors and the published maps; this module decides which slot gets which
expert and moves the bytes. Host slots are filled with a synchronous copy inside the shim. CUDA
slots are filled with cuda-python (`cudaMemcpyBatchAsync`, else `cudaMemcpyAsync`) on a dedicated copy
stream: a slot is unpublished before its copy is issued and published right after, with a fence for
its layer (a CUDA event) that the shim waits for before it next reads that layer's slots. The
emulated GPU of the tests takes the same path, its copies landing only when the shim waits.

Experts in place (gpu_mode="managed"): there is no slot memory. The expert tensors stay in CUDA managed
memory and llama.cpp computes every expert on the GPU; a "slot" is VRAM that one expert's pages occupy.
Loading an expert advises its pages to VRAM and prefetches them there, evicting advises and prefetches
them back to host memory, where the GPU reads cold experts over PCIe (cuda-python cudaMemAdvise and
cudaMemPrefetchAsync on a stream of their own). The driver keeps the pages coherent while they move,
so a slot is published at once, with no fence.
"""
from __future__ import annotations

import ctypes
import itertools
from concurrent.futures import Future, ThreadPoolExecutor
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
                         reserve: int = VRAM_RESERVE, free_what: str = "is free after loading the model") -> None:
    """Raise ValueError naming the largest K that fits when K slots per layer do not fit."""
    need = k * slot_bytes_per_expert * n_layers
    if need + reserve <= free_bytes:
        return
    fits = largest_k_that_fits(free_bytes, slot_bytes_per_expert, n_layers, n_expert, reserve)
    raise ValueError(
        f"hot_experts={k} needs {need / 2**30:.2f} GiB of VRAM for its slots ({k} x "
        f"{slot_bytes_per_expert / 2**20:.2f} MiB per expert x {n_layers} layers) plus "
        f"{reserve / 2**30:.2f} GiB of headroom, but only {max(free_bytes, 0) / 2**30:.2f} GiB {free_what}. "
        f"The largest hot_experts that fits is {fits}."
    )


def free_vram_bytes() -> int:
    """Free memory of the current CUDA device, as the CUDA runtime reports it."""
    from cuda.bindings import runtime as cudart

    err, free, _total = cudart.cudaMemGetInfo()
    check_cuda(cudart, err, "cudaMemGetInfo")
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


def check_cuda(cudart, err, what: str) -> None:
    """Raise, saying what to do, when a cuda-python runtime call returned an error."""
    if err == cudart.cudaError_t.cudaErrorInsufficientDriver:
        raise RuntimeError(
            f"llamahot: {what} failed: the installed cuda-python is newer than this machine's CUDA "
            "driver. Install the cuda-python of your CUDA major version, e.g. "
            "`pip install \"cuda-python<13\"` for CUDA 12."
        )
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"llamahot: {what} failed: {err}")


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
        check_cuda(self.rt, err, what)

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


class ManagedPages:
    """Where the pages of experts in CUDA managed memory live: host memory (cold, mapped in the GPU's page
    tables so its kernels read them over PCIe without faults) or VRAM (hot).

    The driver's page moves cost ~0.5 ms per expert matrix set in and more out (H100, session 18), far more
    than the copy itself, and they block the calling thread: they run in a worker thread of their own,
    in order, while llama decodes (cuda-python releases the GIL). The driver keeps pages coherent while
    they move, so nothing waits for them.

    Two ways to move (set_mode, for A/B; the hot set must be empty when it changes):
    - migrate: a hot expert's pages are advised to VRAM and prefetched there, an evicted one's advised
      and prefetched back to host memory (a copy each way);
    - read-mostly: pages stay preferred in host memory; a hot expert is marked read-mostly and
      prefetched to the GPU, which makes a read-only copy there; evicting unmarks it, which drops the
      GPU's copy (no copy back: the host's is still valid)."""

    def __init__(self, *, read_mostly: bool = False, background: bool = True):
        from cuda.bindings import runtime as cudart
        self.rt = cudart
        err, device = cudart.cudaGetDevice()
        self._check(err, "cudaGetDevice")
        self.host = cudart.cudaMemLocation()
        self.host.type = cudart.cudaMemLocationType.cudaMemLocationTypeHost
        self.gpu = cudart.cudaMemLocation()
        self.gpu.type = cudart.cudaMemLocationType.cudaMemLocationTypeDevice
        self.gpu.id = device
        err, self.stream = cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)
        self._check(err, "cudaStreamCreateWithFlags")
        self.read_mostly = read_mostly
        self.background = background
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamahot-pages")
        self._queued: list[tuple[Future, int]] = []   # (moves, loads among them), in order

    def _check(self, result, what: str) -> None:
        check_cuda(self.rt, result[0] if isinstance(result, tuple) else result, what)

    def set_mode(self, *, read_mostly: bool, background: bool) -> None:
        self.wait()
        self.read_mostly, self.background = read_mostly, background

    def keep_on_gpu(self, buffers: list[tuple[int, int]]) -> None:
        """The model's weight buffers that hold the experts (all of them CUDA managed memory: checked):
        their pages stay in VRAM (the experts' own ranges are advised otherwise next)."""
        for base, size in buffers:
            err, attributes = self.rt.cudaPointerGetAttributes(base)
            if err != self.rt.cudaError_t.cudaSuccess or attributes.type != self.rt.cudaMemoryType.cudaMemoryTypeManaged:
                raise RuntimeError(
                    "llamahot: the expert tensors are not in CUDA managed memory, so gpu_mode='managed' cannot "
                    "move them (was GGML_CUDA_ENABLE_UNIFIED_MEMORY changed while the model loaded, or are they "
                    "placed by a tensor_buft_override of yours?). Leave expert placement to llamahot.")
            self._check(self.rt.cudaMemAdvise(base, size, self.rt.cudaMemoryAdvise.cudaMemAdviseSetPreferredLocation,
                                              self.gpu), "cudaMemAdvise(preferred location: GPU)")

    def map_cold(self, base: int, size: int) -> None:
        """Expert pages: preferred in host memory and mapped in the GPU's page tables, so its kernels
        read them there over PCIe without faulting them over."""
        advice = self.rt.cudaMemoryAdvise
        self._check(self.rt.cudaMemAdvise(base, size, advice.cudaMemAdviseSetPreferredLocation, self.host),
                    "cudaMemAdvise(preferred location: host)")
        self._check(self.rt.cudaMemAdvise(base, size, advice.cudaMemAdviseSetAccessedBy, self.gpu),
                    "cudaMemAdvise(accessed by: GPU)")

    def move(self, ranges: list[tuple[int, int]], to_gpu: bool, n_loads: int = 0) -> None:
        """Bring (address, bytes) ranges into VRAM or send them out of it (queued in order)."""
        self._submit(self._move, list(ranges), to_gpu, n_loads)

    def reset_to_host(self, ranges: list[tuple[int, int]]) -> None:
        """Every page of the ranges back in host memory, whichever way it was brought in (whole tensors)."""
        self._submit(self._reset, list(ranges), None, 0)

    def _submit(self, fn, ranges, to_gpu, n_loads: int) -> None:
        if self.background:
            self._queued.append((self._worker.submit(fn, ranges, to_gpu), n_loads))
        else:
            fn(ranges, to_gpu)

    def _move(self, ranges: list[tuple[int, int]], to_gpu: bool) -> None:
        rt, advice = self.rt, self.rt.cudaMemoryAdvise
        for address, nbytes in ranges:
            if self.read_mostly:
                mark = advice.cudaMemAdviseSetReadMostly if to_gpu else advice.cudaMemAdviseUnsetReadMostly
                self._check(rt.cudaMemAdvise(address, nbytes, mark, self.gpu), "cudaMemAdvise(read mostly)")
                if to_gpu:
                    self._check(rt.cudaMemPrefetchAsync(address, nbytes, self.gpu, 0, self.stream),
                                "cudaMemPrefetchAsync")
            else:
                where = self.gpu if to_gpu else self.host
                self._check(rt.cudaMemAdvise(address, nbytes, advice.cudaMemAdviseSetPreferredLocation, where),
                            "cudaMemAdvise(preferred location)")
                self._check(rt.cudaMemPrefetchAsync(address, nbytes, where, 0, self.stream), "cudaMemPrefetchAsync")

    def _reset(self, ranges: list[tuple[int, int]], _unused) -> None:
        rt, advice = self.rt, self.rt.cudaMemoryAdvise
        for address, nbytes in ranges:
            self._check(rt.cudaMemAdvise(address, nbytes, advice.cudaMemAdviseUnsetReadMostly, self.gpu),
                        "cudaMemAdvise(read mostly)")
            self._check(rt.cudaMemAdvise(address, nbytes, advice.cudaMemAdviseSetPreferredLocation, self.host),
                        "cudaMemAdvise(preferred location)")
            self._check(rt.cudaMemPrefetchAsync(address, nbytes, self.host, 0, self.stream), "cudaMemPrefetchAsync")
        self._check(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def in_flight(self) -> int:
        """Loads whose moves are still queued or running; never waits (a failed move raises here)."""
        while self._queued and self._queued[0][0].done():
            self._queued.pop(0)[0].result()
        return sum(n for _, n in self._queued)

    def wait(self) -> None:
        while self._queued:
            self._queued.pop(0)[0].result()
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.stream is None:
            return
        try:
            self.wait()
        finally:
            self._worker.shutdown()
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


class HostPages:
    """The emulated GPU's stand-in for ManagedPages (tests): experts in place in host memory, each
    move recorded, so CI checks which pages would go where while llama.cpp computes as stock."""

    def __init__(self):
        self.on_gpu: set[int] = set()          # range addresses whose pages would be in VRAM
        self.cold: list[tuple[int, int]] = []   # ranges mapped cold (map_cold)
        self.kept: list[tuple[int, int]] = []   # buffers kept on the GPU (keep_on_gpu)
        self.moves = 0
        self.read_mostly, self.background = False, True

    def keep_on_gpu(self, buffers: list[tuple[int, int]]) -> None:
        self.kept = list(buffers)

    def map_cold(self, base: int, size: int) -> None:
        self.cold.append((base, size))

    def move(self, ranges: list[tuple[int, int]], to_gpu: bool, n_loads: int = 0) -> None:
        for address, nbytes in ranges:
            inside = [a for a in self.on_gpu if address <= a < address + nbytes]
            self.on_gpu.difference_update(inside)
            if to_gpu:
                self.on_gpu.add(address)
            self.moves += 1

    def reset_to_host(self, ranges: list[tuple[int, int]]) -> None:
        self.move(ranges, to_gpu=False)   # a whole tensor at once drops its experts

    def set_mode(self, *, read_mostly: bool, background: bool) -> None:
        self.read_mostly, self.background = read_mostly, background

    def in_flight(self) -> int:
        return 0

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


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
    kind: str                       # "host" | "cuda" | "emulated-gpu" | "managed" (experts in place)
    n_layers: int
    n_expert: int
    n_slots: int
    projections: tuple[int, ...]
    stats: TransferStats = field(default_factory=TransferStats)
    pages: "ManagedPages | None" = None   # kind "managed": moves the experts' pages (owned by the caller)

    def __post_init__(self):
        n = self.n_layers * max(self.n_slots, 1)
        self.expert_of_slot = np.frombuffer(ffi.buffer(lib.lh_expert_of_slot(self.ctx), n * 4), dtype=np.int32)
        self.expert_of_slot = self.expert_of_slot[: self.n_layers * self.n_slots].reshape(self.n_layers, self.n_slots)
        # Its inverse, kept by the shim with it (-1: in no slot): resident() in one comparison.
        self.slot_of_expert = np.frombuffer(ffi.buffer(lib.lh_slot_of_expert(self.ctx), self.n_layers * self.n_expert * 4),
                                            dtype=np.int32).reshape(self.n_layers, self.n_expert)
        self.copies = None
        if self.kind == "managed" and self.pages is None:
            raise ValueError("SlotManager: kind 'managed' needs the ManagedPages of the experts' memory")
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
        keep_src = self.copies is not None or self.pages is not None   # copied from, or moved in place
        if keep_src:
            self.src = np.zeros((self.n_layers, n_proj, self.n_expert), dtype=np.uint64)
        if self.copies is not None:
            self.dst = np.zeros((self.n_layers, n_proj, self.n_slots), dtype=np.uint64)
        for layer in range(self.n_layers):
            for i, proj in enumerate(self.projections):
                self.nbytes[layer, i], src = self._slabs(lib.lh_expert_slab, layer, proj, self.n_expert)
                if keep_src:
                    self.src[layer, i] = src
                if self.copies is not None:
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
        evicted = self.expert_of_slot[layers, slots]
        for layer, slot in zip(layer_list, slot_list):
            check(lib.lh_slot_unpublish(ctx, layer, slot))
        nbytes = self.nbytes[layers].ravel().tolist()   # per load, its matrices' sizes ([n_loads, n_proj])
        if self.pages is not None:
            # Out first: the evicted experts' VRAM is what the newcomers take.
            out = evicted >= 0
            self.pages.move(self._ranges(layers[out], evicted[out]), to_gpu=False)
            self.pages.move(self._ranges(layers, experts), to_gpu=True, n_loads=len(layer_list))
        elif self.copies is None:
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

    def _ranges(self, layers: np.ndarray, experts: np.ndarray) -> list[tuple[int, int]]:
        """(address, bytes) of every matrix of each (layer, expert)."""
        return list(zip(self.src[layers, :, experts].ravel().tolist(), self.nbytes[layers].ravel().tolist()))

    def _tensor_ranges(self) -> list[tuple[int, int]]:
        """(address, bytes) of every managed expert tensor, whole."""
        return [(int(self.src[layer, i, 0]), int(self.nbytes[layer, i]) * self.n_expert)
                for layer in range(self.n_layers) for i in range(len(self.projections))]

    def map_experts_cold(self) -> None:
        """Experts in place, once after the load: every expert tensor's pages preferred in host memory
        and mapped for the GPU."""
        for address, nbytes in self._tensor_ranges():
            self.pages.map_cold(address, nbytes)

    def evict_all(self) -> None:
        """Experts in place: every expert's pages to host memory (whole tensors at once), slots emptied."""
        if self.pages is None:
            return
        self.pages.reset_to_host(self._tensor_ranges())
        for layer in range(self.n_layers):
            for slot in range(self.n_slots):
                self._check(lib.lh_slot_unpublish(self.ctx, layer, slot))

    def update_pending(self) -> None:
        """stats.pending: loads whose copies may still be landing (cheap, never waits)."""
        if self.pages is not None:
            self.stats.pending = self.pages.in_flight()
            return
        self.stats.pending = self.copies.in_flight() if self.copies is not None else 0

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"llamahot: {ffi.string(lib.lh_last_error(self.ctx)).decode()}")

    def close(self) -> None:
        """Wait for the copies in flight and drop the fences (their events go with the copies)."""
        if self.pages is not None:   # the moves in flight finish; the pages object stays with its owner
            self.pages.wait()
            self.pages = None
        if self.copies is not None:
            self.copies.close()
            for layer in range(self.n_layers):
                lib.lh_set_fence(self.ctx, layer, ffi.NULL)
            lib.lh_set_fence_waiter(self.ctx, ffi.NULL)
            self.copies = None
