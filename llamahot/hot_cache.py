"""The per-context hot-expert cache: owns the shim context, the policy and the slots.

One HotCache per llamahot.Llama. It is created before the llama context (its callback and
user_data go into the context params), attached once the context exists (slots allocated and,
after each eval, routing fed to the policy and slots rebalanced), and released after the context
is freed.

Data flows one way per token: router ids -> shim counters -> policy -> slot plan -> copies ->
slot maps the shim reads.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import os
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import llama_cpp
import numpy as np

from llamahot._shim import ffi, lib
from llamahot.model_info import EXPERT_TENSOR_PATTERN, MoELayout
from llamahot.monitor import SnapshotWriter
from llamahot.policy import (IN_PLACE_LEARN_TOKENS, IN_PLACE_OBSERVE_BURST, IN_PLACE_OBSERVE_EVERY,
                             IN_PLACE_REBALANCE_INTERVAL, REBALANCE_INTERVAL, make_policy)
from llamahot.profile import RoutingProfile, load_profile
from llamahot.slots import HostPages, ManagedPages, SlotManager, check_vram_for_slots, free_vram_bytes

# The shim's enums (csrc/llamahot.h), by the names Python uses.
# lh_proj of each projection name in a MoELayout.
PROJ_INDEX = {"gate": lib.LH_PROJ_GATE, "up": lib.LH_PROJ_UP, "down": lib.LH_PROJ_DOWN, "gate_up": lib.LH_PROJ_GATE_UP}
# "emulated-gpu" is test-only: a second CPU backend in the GPU's place, so CI runs the GPU code path.
# "managed": CUDA with the experts in place (gpu_mode="managed"), no slot memory.
SLOT_KINDS = {"host": lib.LH_SLOTS_HOST, "cuda": lib.LH_SLOTS_GPU, "emulated-gpu": lib.LH_SLOTS_EMULATED_GPU,
              "managed": lib.LH_SLOTS_IN_PLACE}
DEBUG_POISON = lib.LH_DEBUG_POISON
DEBUG_SHADOW = lib.LH_DEBUG_SHADOW
DEBUG_PER_NODE = lib.LH_DEBUG_PER_NODE
DEBUG_SKIP_COMPUTE = lib.LH_DEBUG_SKIP_COMPUTE
DEBUG_TIMELINE = lib.LH_DEBUG_TIMELINE
DEBUG_CALL_GRAPHS = lib.LH_DEBUG_CALL_GRAPHS
DEBUG_GGML_MATMULS = lib.LH_DEBUG_GGML_MATMULS
DEBUG_ALL_THREADS = lib.LH_DEBUG_ALL_THREADS
DEBUG_COLD_AFTER_SUBMIT = lib.LH_DEBUG_COLD_AFTER_SUBMIT
DEBUG_CALL_COLD_GRAPHS = lib.LH_DEBUG_CALL_COLD_GRAPHS
DEBUG_SERIAL_ELEMENTWISE = lib.LH_DEBUG_SERIAL_ELEMENTWISE
DEBUG_NO_SPLIT_START_STOPS = lib.LH_DEBUG_NO_SPLIT_START_STOPS
DEBUG_STAY_HOOKED = lib.LH_DEBUG_STAY_HOOKED
TIMELINE_CAP = lib.LH_TIMELINE_CAP
SNAPSHOT_PERIOD_S = 0.05  # live snapshot refresh: often enough for a monitor, cheap per token


class HostPlacement:
    """A `tensor_buft_overrides` list for llama_model_params that puts the tensors whose names match
    `pattern` (a regex) in host memory, like `-ot PATTERN=CPU`. The list and its string are owned
    here: keep this object alive until the model is loaded."""

    def __init__(self, pattern: str):
        self._pattern = ffi.new("char[]", pattern.encode())
        self._overrides = ffi.new("struct llama_model_tensor_buft_override[2]")  # NULL-terminated
        self._overrides[0].pattern = self._pattern
        self._overrides[0].buft = lib.ggml_backend_cpu_buffer_type()

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self._overrides))


# With CUDA slots, the share of a stop's cold rows sent to the GPU unless asked otherwise: one row of
# every stop with 2 to 4 (rounded), so the DMA engine reads host memory beside the CPU
# (benchmarks/RESULTS.md, session 17: +0.6 % to +7 % decode at K=51 on the H100, routed model).
DEFAULT_COLD_ON_DEVICE = 0.34


def _check_cold_on_device(share: Any, slot_device: str, gpu_mode: Optional[str] = None) -> float:
    if share is None:
        return DEFAULT_COLD_ON_DEVICE if slot_device == "cuda" and gpu_mode != "managed" else 0.0
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"cold_on_device must be a number in 0..1 (the share of cold experts computed on the "
                         f"device), got {share!r}")
    if share > 0 and gpu_mode == "managed":
        raise ValueError(f"cold_on_device={share} is an option of gpu_mode='redirect'; with gpu_mode='managed' "
                         "the GPU computes every expert already (the cold ones read from host memory). Leave it "
                         "out, or pass gpu_mode='redirect'.")
    if share > 0 and slot_device not in ("cuda", "emulated-gpu"):
        raise ValueError(f"cold_on_device={share} needs slots on a GPU (slot_device='cuda'); with "
                         f"slot_device={slot_device!r} the cold experts are computed on the CPU anyway: use 0.")
    return float(share)


def _check_plan_ahead(plan_ahead: Any) -> bool:
    if not isinstance(plan_ahead, bool):
        raise ValueError(f"plan_ahead must be True or False, got {plan_ahead!r}")
    return plan_ahead


class HotCache:
    """Hot-expert slots, routing counters and statistics of one llamahot context."""

    _ctx = None  # so release() is safe on an instance whose __init__ raised
    _plan: Optional[Future] = None   # loads planned in the worker from the routing before the last eval
    _planner: Optional[ThreadPoolExecutor] = None

    def __init__(self, layout: MoELayout, *, hot_experts: int, rebalance_interval: Optional[int],
                 prefill_bypass: int, slot_device: str, policy: str = "decayed", resident_layers: int = 0,
                 cold_on_device: Optional[float] = None, plan_ahead: bool = False,
                 gpu_mode: Optional[str] = None, routing_profile: Optional[str | os.PathLike] = None):
        # The last `resident_layers` MoE layers keep all their experts on the GPU, untouched: llamahot
        # manages (counts, slots, layer indices) the others only.
        self.resident_layers = resident_layers
        self.full_layout = layout
        layout = layout.without_last(resident_layers)
        self.layout = layout
        self.hot_experts = hot_experts
        self.prefill_bypass = prefill_bypass
        self.slot_device = slot_device
        # With CUDA: "managed" (experts in place, in CUDA managed memory) or "redirect" (slots + stops);
        # the emulated GPU of the tests takes either path.
        self.gpu_mode = gpu_mode if slot_device in ("cuda", "emulated-gpu") else None
        self.in_place = self.gpu_mode == "managed"
        if rebalance_interval is None:
            rebalance_interval = IN_PLACE_REBALANCE_INTERVAL if self.in_place else REBALANCE_INTERVAL
        self.rebalance_interval = rebalance_interval
        self.cold_on_device = _check_cold_on_device(cold_on_device, slot_device, self.gpu_mode)
        _check_plan_ahead(plan_ahead)
        self.policy_name = policy
        # Fails fast on a bad name, before any model is loaded.
        self.policy = make_policy(policy, layout.n_moe_layers, layout.n_expert, hot_experts, rebalance_interval,
                                  in_place=self.in_place)
        # A routing profile (llamahot.profile), read before the model loads so a bad one fails fast:
        # the policy's prior, and where this context's routing is added when it closes.
        self.routing_profile = None if routing_profile is None else os.fspath(routing_profile)
        self._profile: Optional[RoutingProfile] = None
        self._save_at_exit = None
        if self.routing_profile is not None:
            self._profile = load_profile(self.routing_profile, layout)
            self._set_prior(self.policy)
            # Applications (and llama_cpp.server) often exit without closing their Llama.
            self._save_at_exit = functools.partial(_save_profile_at_exit, weakref.ref(self))
            atexit.register(self._save_at_exit)

        blk_to_moe = layout.blk_to_moe()
        ctx = lib.lh_ctx_new(layout.n_blocks, ffi.from_buffer("int32_t[]", blk_to_moe),
                             layout.n_moe_layers, layout.n_expert)
        if ctx == ffi.NULL:
            raise MemoryError("llamahot: could not allocate the shim context")
        self._ctx = ctx
        n_layers, n_expert = layout.n_moe_layers, layout.n_expert
        self._counts = _int64_view(lib.lh_routing_counts(ctx), n_layers * n_expert).reshape(n_layers, n_expert)
        self._hits = _int64_view(lib.lh_hits(ctx), n_layers)
        self._misses = _int64_view(lib.lh_misses(ctx), n_layers)
        self._last_routed = _int64_view(lib.lh_last_routed(ctx), n_layers * n_expert).reshape(n_layers, n_expert)
        self._seen = np.zeros((n_layers, n_expert), dtype=np.int64)  # counts already fed to the policy
        self._history = np.zeros((n_layers, n_expert), dtype=np.int64)  # all routing, across reset()
        self._final: Optional[tuple[np.ndarray, dict]] = None  # snapshot kept after release()
        self._saved = np.zeros((n_layers, n_expert), dtype=np.int64)  # history already in the profile

        # Placement of the managed layers' routed-expert tensors in host memory (what `-ot exps=CPU`
        # does); with resident layers (a layout cut short) the others stay where llama puts them. In
        # place (gpu_mode="managed") nothing is overridden: the experts load on the GPU with the rest.
        pattern = layout.expert_pattern() if resident_layers else EXPERT_TENSOR_PATTERN
        self._placement = None if self.in_place else HostPlacement(pattern)
        self._pages: Optional[ManagedPages] = None

        self.slots: Optional[SlotManager] = None
        self._snapshot: Optional[SnapshotWriter] = None
        self._user_callback: Any = None  # (callback, user_data): keeps an application's ctypes callback alive
        self._tokens_since_rebalance = 0
        self._filled = False  # the first eval (the prompt) fills the slots
        # plan_ahead: the policy plans a decode step's loads in a worker thread while llama decodes the
        # next token (ctypes releases the GIL); after that eval only the copies are issued.
        self.plan_ahead = plan_ahead
        # set_thread_pool: on a GPU machine llama's own CPU work during the decode is small, so the
        # stops' threads can spin between stops (~5 % faster decode on the H100 machine, session 11);
        # on a CPU-only machine they would compete with llama's OpenMP team for the cores. 20 ms, not
        # 1: where cold rows are rare (high K) a stop found the threads asleep and waited ~50 us for
        # the last to wake (K=96: cold rows 1.47 -> 0.75 ms per token, session 15).
        self.thread_pool_spin_ms: Optional[float] = 20.0 if slot_device == "cuda" else None
        # In place: None reads every decode step's routing while the policy learns, then one in
        # IN_PLACE_OBSERVE_EVERY (_auto_observe); an integer (set_observe_every) fixes it.
        self.observe_every: Optional[int] = None
        self.observe_burst = IN_PLACE_OBSERVE_BURST   # (set_observe_every)
        self._observing_every = 1   # what the shim does now
        self.row_prefetch: int = lib.LH_ROW_PREFETCH_DEFAULT
        self._snapshot_time = 0.0
        self._decode_tokens = 0
        self._decode_seconds = 0.0
        self._prefill_tokens = 0
        self._prefill_seconds = 0.0

    # -- wiring into llama.cpp (used by llamahot.Llama) ------------------------------------
    @property
    def tensor_buft_overrides_address(self) -> Optional[int]:
        """The tensor_buft_overrides for llama_model_params (None: none, the experts stay in place)."""
        return self._placement.address if self._placement is not None else None

    @property
    def eval_callback_address(self) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, "lh_eval_callback")))

    @property
    def user_data_address(self) -> int:
        return int(ffi.cast("uintptr_t", self._ctx))

    def chain_user_callback(self, callback: Any, user_data: Optional[int] = None) -> None:
        """Chain an application's eval callback (a ctypes ggml_backend_sched_eval_callback).

        It is installed by attach(), after the warm-up decode, so it sees only the application's own
        evals."""
        self._user_callback = (callback, user_data)

    def attach(self, llama_ctx: Any, model: Any, n_threads: int, model_name: str = "") -> None:
        """Allocate the slots once the llama context exists.

        The shim recognises the expert weights when a graph first runs through its callback, so
        one single-token decode runs first; the context's memory is cleared after it, leaving the
        context as llama_cpp created it.
        """
        self._llama_ctx = ffi.cast("void *", llama_ctx or 0)   # for lh_before_decode
        vocab = llama_cpp.llama_model_get_vocab(model)
        token = llama_cpp.llama_vocab_bos(vocab)
        tokens = (llama_cpp.llama_token * 1)(token if token >= 0 else 0)
        rc = llama_cpp.llama_decode(llama_ctx, llama_cpp.llama_batch_get_one(tokens, 1))
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llama_ctx), True)
        if rc != 0:
            raise RuntimeError(f"llamahot: the warm-up decode failed (llama_decode returned {rc})")
        projections = tuple(PROJ_INDEX[p] for p in self.layout.projections)
        where = "in llamahot's managed memory" if self.in_place else "through the CPU"
        for layer in range(self.layout.n_moe_layers):
            found = lib.lh_layer_weight_count(self._ctx, layer)
            if found != len(projections):
                raise RuntimeError(
                    f"llamahot: MoE layer {layer} (block {self.layout.moe_blocks[layer]}) ran "
                    f"{found} of its {len(projections)} routed-expert matmuls {where}, so its "
                    "experts cannot be managed. Is a tensor_buft_override or n_cpu_moe setting moving "
                    "them elsewhere? Leave expert placement to llamahot."
                )
        if self.in_place:
            self._pages = ManagedPages() if self.slot_device == "cuda" else HostPages()
            self._pages.keep_on_gpu(self._weight_buffers(projections))
        if self.slot_device == "cuda" and not self.in_place:   # in place: checked before the load
            check_vram_for_slots(self.hot_experts, free_vram_bytes(), self.layout.expert_matrix_bytes,
                                 self.layout.n_moe_layers, self.layout.n_expert)
        if lib.lh_slots_init(self._ctx, SLOT_KINDS[self._slot_kind], self.hot_experts,
                             self.prefill_bypass, n_threads) != 0:
            raise RuntimeError(f"llamahot: could not set up {self.hot_experts} {self.slot_device} slots per "
                               f"layer: {ffi.string(lib.lh_last_error(self._ctx)).decode()}")
        self.slots = SlotManager(self._ctx, self._slot_kind, self.layout.n_moe_layers, self.layout.n_expert,
                                 self.hot_experts, projections, pages=self._pages)
        if self.in_place:
            # The experts' pages go to host memory, mapped for the GPU; the prompt fills K per layer.
            self.slots.map_experts_cold()
            self.slots.evict_all()
            self.set_observe_every(self.observe_every, self.observe_burst)
        else:
            self.set_cold_on_device(self.cold_on_device)
            self.set_thread_pool(self.thread_pool_spin_ms)
            self.set_row_prefetch(self.row_prefetch)
        lib.lh_reset_counters(self._ctx)
        if self.hot_experts and self._profile is not None and self._profile.tokens.any():
            # The profile's hot set before the first prompt; the prompt then rebalances as usual.
            resident = self.slots.resident()
            self.slots.load(*self.slots.plan(self.policy.choose(resident), resident))
        if self._user_callback is not None:
            callback, user_data = self._user_callback
            address = ctypes.cast(callback, ctypes.c_void_p).value
            lib.lh_set_user_callback(self._ctx, ffi.cast("ggml_backend_sched_eval_callback", address),
                                     ffi.cast("void *", user_data or 0))
        self._model_name = model_name or os.path.basename(self.layout.path)
        self._new_snapshot()

    def measure_vram_in_place(self, model_bytes: int) -> None:
        """Experts in place, before the model loads: the VRAM the hot experts may take is what is free now
        less the model's other weights (they stay in VRAM). After the load the runtime's free memory says
        little: the driver keeps VRAM its managed pages used after they move to host. Checks K."""
        other_weights = model_bytes - self.layout.expert_tensor_bytes
        self._vram_in_place = free_vram_bytes() - other_weights
        self.check_vram_in_place(self.hot_experts)

    def check_vram_in_place(self, k: int) -> None:
        check_vram_for_slots(k, self._vram_in_place, self.layout.expert_matrix_bytes, self.layout.n_moe_layers,
                             self.layout.n_expert, free_what="is free for them (VRAM free before the load, less "
                             "the model's other weights)")

    def _weight_buffers(self, projections: tuple[int, ...]) -> list[tuple[int, int]]:
        """(base, size) of the buffers holding the managed layers' expert tensors, each once."""
        base, size = ffi.new("void **"), ffi.new("size_t *")
        found = set()
        for layer in range(self.layout.n_moe_layers):
            for proj in projections:
                if lib.lh_weight_buffer(self._ctx, layer, proj, base, size) == 0:
                    found.add((int(ffi.cast("uintptr_t", base[0])), int(size[0])))
        return sorted(found)

    @property
    def _slot_kind(self) -> str:
        return "managed" if self.in_place else self.slot_device

    def before_eval(self, n_tokens: int) -> None:
        """Before each Llama.eval of n_tokens: in place, the shim decides whether its decode is read, and runs
        a single-token one that is not without the eval callback (lh_before_decode)."""
        if self.in_place and self.slots is not None:
            lib.lh_before_decode(self._ctx, self._llama_ctx, n_tokens)

    def end_of_eval(self) -> int:
        """Undo graph changes a failed or aborted decode left behind; returns how many (0 normally)."""
        return lib.lh_restore(self._ctx) if self._ctx is not None else 0

    def after_eval(self, n_tokens: int, seconds: float) -> None:
        """After each Llama.eval: timing, routing into the policy, rebalance when due."""
        if n_tokens == 1:
            self._decode_tokens += 1
            self._decode_seconds += seconds
        else:
            self._prefill_tokens += n_tokens
            self._prefill_seconds += seconds
        if self.slots is None:
            return
        if self.hot_experts:
            if self._plan is not None and n_tokens == 1:
                # Planned in the worker during this decode step. (After a prompt, the prompt's own
                # rebalance replaces it; a prompt too short to rebalance leaves it for the next step.)
                self._issue_plan()
            # Per eval only what must happen per eval; policy work waits for the rebalance.
            if self.slots.stats.pending:
                self.slots.update_pending()
            self._tokens_since_rebalance += n_tokens
            # The first fill follows the prompt's routing; then one rebalance per interval.
            if not self._filled or self._tokens_since_rebalance >= self.rebalance_interval:
                # A prompt (new text, its routing the best guide; no decode waits on it) rebalances
                # at once; decode steps may leave the planning to the worker.
                self.rebalance(ahead=self.plan_ahead and n_tokens == 1)
        now = time.monotonic()
        if now - self._snapshot_time >= SNAPSHOT_PERIOD_S:
            self._publish_snapshot(now)

    def rebalance(self, ahead: bool = False) -> None:
        """Feed the routing since the last rebalance to the policy, plan the hot set and issue the
        copies (never waits for them). ahead: plan in the worker while the next token decodes; the
        copies are issued after that token (after_eval), so they serve one token later."""
        start = time.perf_counter()
        delta = self._fold()
        n_tokens, self._tokens_since_rebalance = self._tokens_since_rebalance, 0
        self._drop_plan()
        if ahead and self._filled:
            if self._planner is None:
                self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamahot-planner")
            # The shim updates last_routed during the next eval: the worker gets a copy.
            self._plan = self._planner.submit(self._plan_loads, delta, n_tokens, self._last_routed.copy())
        else:
            self.slots.load(*self._plan_loads(delta, n_tokens, self._last_routed))
        self._filled = True
        self._auto_observe()
        self._count_stall(start)

    def _issue_plan(self) -> None:
        """Issue the copies of the plan made in the worker (waits for it if it is not done)."""
        start = time.perf_counter()
        plan, self._plan = self._plan, None
        self.slots.load(*plan.result())
        self._count_stall(start)

    def _count_stall(self, start: float) -> None:
        """The stall a decode step sees: the policy's work (unless planned ahead) and issuing the copies."""
        stats = self.slots.stats
        stats.last_rebalance_ms = (time.perf_counter() - start) * 1e3
        stats.max_rebalance_ms = max(stats.max_rebalance_ms, stats.last_rebalance_ms)
        stats.total_rebalance_ms += stats.last_rebalance_ms

    def _plan_loads(self, delta: np.ndarray, n_tokens: int, last_routed: np.ndarray):
        self.policy.observe(delta, n_tokens, last_routed)
        resident = self.slots.resident()
        return self.slots.plan(self.policy.choose(resident), resident)

    def _drop_plan(self) -> None:
        """Wait for a plan in the worker and forget it (the slots are about to change under it)."""
        if self._plan is not None:
            self._plan.result()
            self._plan = None

    def set_hot_experts(self, k: int) -> None:
        """Change the number of slots per layer without reloading the model.

        Waits for copies in flight, frees the old slots, allocates K new (empty) ones, and refills
        them from the policy's routing history at the next eval. K = 0 turns redirection off.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.layout.n_expert:
            raise ValueError(f"hot_experts must be an integer in 0..{self.layout.n_expert}, got {k!r}")
        if self.slots is None:
            raise RuntimeError("llamahot: the slots are not set up (the Llama was closed?)")
        if self.slot_device == "cuda" and k > self.hot_experts:
            if self.in_place:
                self.check_vram_in_place(k)
            else:
                grow = k - self.hot_experts  # the old slots' memory is freed before the new ones are made
                check_vram_for_slots(grow, free_vram_bytes(), self.layout.expert_matrix_bytes,
                                     self.layout.n_moe_layers, self.layout.n_expert)
        self._drop_plan()
        self.slots.evict_all()   # experts in place: the old hot set's pages leave VRAM
        self.slots.close()
        error = None
        if lib.lh_slots_resize(self._ctx, k) != 0:
            error = ffi.string(lib.lh_last_error(self._ctx)).decode()
            k = 0
            lib.lh_slots_resize(self._ctx, 0)
        stats = self.slots.stats
        self.hot_experts = k
        self.policy.k = k
        self.slots = SlotManager(self._ctx, self._slot_kind, self.layout.n_moe_layers, self.layout.n_expert, k,
                                 self.slots.projections, stats, pages=self._pages)
        self._filled = False
        self._snapshot.close()
        self._new_snapshot()  # its shape depends on K
        if error is not None:
            raise RuntimeError(f"llamahot: could not set up the slots ({error}); hot experts are off (K=0)")

    # -- test and benchmark controls -------------------------------------------------------
    def set_debug(self, *, poison: bool = False, shadow: bool = False, per_node: bool = False,
                  skip_compute: bool = False, timeline: bool = False, call_graphs: bool = False,
                  ggml_matmuls: bool = False, all_threads: bool = False, cold_after_submit: bool = False,
                  call_cold_graphs: bool = False, serial_elementwise: bool = False,
                  no_split_start_stops: bool = False, stay_hooked: bool = False) -> None:
        """Test-only checks. poison: NaN-fill redirected outputs before writing them; shadow: let
        llama compute, recompute, compare every row; per_node: redirect each expert matmul on its
        own (the fallback path) instead of each layer's FFN in one stop. For benchmarks:
        skip_compute (outputs are garbage): stop as usual but compute nothing, the floor of the
        stops; timeline: record every callback, read with timeline(); call_graphs: build the hot
        part's device graph per call instead of using the layer's persistent one (single-token decode
        on a device), to measure what the persistent graph saves; ggml_matmuls: ggml's MUL_MAT_ID in
        single-token CPU graphs instead of the shim's row-sliced node, to measure what that saves;
        all_threads (tests): every stop's CPU graph on all threads, however little it reads;
        cold_after_submit: a stop's cold rows start on the shim's threads only after its hot part is
        submitted to the GPU (the caller computing its share), not before, to measure what starting
        them first saves; call_cold_graphs: build a single-token stop's cold CPU graph per call instead
        of replaying the layer's persistent one for that many rows, to measure what replaying saves;
        serial_elementwise: a pool graph's element-wise nodes between its sliced matmuls (the GLU) run
        on one thread between two barriers instead of each thread on its own slice, to measure what
        co-slicing saves; no_split_start_stops: in place, unread steps run each device split in one piece
        (no split_start_stops), to measure what those stops save; stay_hooked: in place, unread steps keep
        the eval callback installed (never unhooked_decodes), to measure what removing it saves."""
        lib.lh_set_debug(self._ctx, (DEBUG_POISON if poison else 0) | (DEBUG_SHADOW if shadow else 0) |
                         (DEBUG_PER_NODE if per_node else 0) | (DEBUG_SKIP_COMPUTE if skip_compute else 0) |
                         (DEBUG_TIMELINE if timeline else 0) | (DEBUG_CALL_GRAPHS if call_graphs else 0) |
                         (DEBUG_GGML_MATMULS if ggml_matmuls else 0) | (DEBUG_ALL_THREADS if all_threads else 0) |
                         (DEBUG_COLD_AFTER_SUBMIT if cold_after_submit else 0) |
                         (DEBUG_CALL_COLD_GRAPHS if call_cold_graphs else 0) |
                         (DEBUG_SERIAL_ELEMENTWISE if serial_elementwise else 0) |
                         (DEBUG_NO_SPLIT_START_STOPS if no_split_start_stops else 0) |
                         (DEBUG_STAY_HOOKED if stay_hooked else 0))

    def timeline(self) -> list[tuple[int, int, int, str]]:
        """Callbacks recorded in timeline mode since the last call, oldest first: (time ns, kind
        (1 ask, 0 answer begins, 2 answer ends), host (the node is in a CPU split), node name)."""
        events = ffi.new("struct lh_event[]", TIMELINE_CAP)
        n = lib.lh_timeline(self._ctx, events, TIMELINE_CAP)
        return [(events[i].t_ns, events[i].kind, events[i].host, ffi.string(events[i].name).decode(errors="replace"))
                for i in range(n)]

    def set_cold_on_device(self, share: float) -> None:
        """Single-token decode with device slots: copy this share (0..1) of each layer's cold experts
        to the device and compute them there while the CPU computes the rest (0: all on the CPU)."""
        share = _check_cold_on_device(share, self.slot_device, self.gpu_mode)
        if lib.lh_set_cold_on_device(self._ctx, share) != 0:
            raise RuntimeError(f"llamahot: {ffi.string(lib.lh_last_error(self._ctx)).decode()}")
        self.cold_on_device = share

    def set_thread_pool(self, spin_ms: Optional[float]) -> None:
        """Single-token stops compute their CPU rows on threads of the shim's own, which spin
        `spin_ms` milliseconds after each stop before they sleep (a stop reaches spinning threads in
        a few microseconds, an OpenMP region in 10-20); None: ggml's graph compute on llama's
        OpenMP team. Bit-exact either way."""
        if spin_ms is not None and (isinstance(spin_ms, bool) or not isinstance(spin_ms, (int, float))
                                    or not 0 <= spin_ms <= 1000):
            raise ValueError(f"set_thread_pool takes None (off) or the milliseconds idle threads spin "
                             f"before they sleep, 0..1000; got {spin_ms!r}")
        self.thread_pool_spin_ms = spin_ms
        if self._ctx is not None:
            lib.lh_set_pool(self._ctx, -1 if spin_ms is None else int(spin_ms * 1e6))

    def set_row_prefetch(self, n_bytes: int) -> None:
        """In the stops' row-sliced expert matmuls each thread prefetches `n_bytes` ahead of the rows
        it computes, across its slices of the node's experts (default 4096: cold 1-8 row FFNs ran as
        fast as warm ones on the H100 machine); 0: the hardware prefetchers alone. Bit-exact either way."""
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or not 0 <= n_bytes <= lib.LH_ROW_PREFETCH_MAX:
            raise ValueError(f"set_row_prefetch takes a byte distance 0..{lib.LH_ROW_PREFETCH_MAX}, got {n_bytes!r}")
        self.row_prefetch = n_bytes
        if self._ctx is not None and lib.lh_set_row_prefetch(self._ctx, n_bytes) != 0:
            raise RuntimeError(f"llamahot: {ffi.string(lib.lh_last_error(self._ctx)).decode()}")

    def set_threads(self, n_threads: int) -> None:
        """CPU threads for the cold experts' graphs (llama's n_threads at load; call it again after
        changing llama's with llama_set_n_threads)."""
        if n_threads < 1:
            raise ValueError(f"llamahot: n_threads must be >= 1, got {n_threads}")
        if self._ctx is not None:
            lib.lh_set_n_threads(self._ctx, int(n_threads))

    def set_lone_row_idle_ms(self, ms: float) -> None:
        """A stop whose CPU work is a single expert row runs on one thread when the shim ran no
        multi-threaded graph for `ms` milliseconds (llama's thread pool may be asleep then, and waking
        it can cost more than the row); 0 (default): off."""
        if ms < 0:
            raise ValueError(f"llamahot: the idle time must be >= 0 ms, got {ms}")
        if self._ctx is not None:
            lib.lh_set_lone_row_idle_ns(self._ctx, int(ms * 1e6))

    def use_policy(self, policy, *, rebalance_interval: Optional[int] = None,
                   plan_ahead: Optional[bool] = None) -> None:
        """Switch to another policy object (see llamahot.policy) and, if given, rebalance interval and
        plan_ahead, after any plan in the worker is finished and dropped."""
        if plan_ahead is not None:
            _check_plan_ahead(plan_ahead)
        self._drop_plan()
        policy.k = self.hot_experts
        self._set_prior(policy)
        self.policy = policy
        self.policy_name = getattr(policy, "name", type(policy).__name__)
        if rebalance_interval is not None:
            self.rebalance_interval = rebalance_interval
        if plan_ahead is not None:
            self.plan_ahead = plan_ahead

    def set_page_moves(self, *, read_mostly: bool = False, background: bool = True) -> None:
        """Experts in place (gpu_mode="managed"; benchmarks): how expert pages move (see
        llamahot.slots.ManagedPages): read_mostly: read-only copies on the GPU instead of migrations;
        background: the driver calls in a worker thread instead of the caller. The hot set is emptied
        and refills at the next eval."""
        if not self.in_place or self.slots is None:
            raise RuntimeError("llamahot: set_page_moves applies to gpu_mode='managed' (experts in place)")
        self._drop_plan()
        self.slots.evict_all()
        self._pages.set_mode(read_mostly=read_mostly, background=background)
        self._filled = False

    def set_observe_every(self, n: Optional[int], burst: int = IN_PLACE_OBSERVE_BURST) -> None:
        """Experts in place: read the routing of one single-token decode step in n (prompts always), `burst`
        steps in a row in every n * burst; 1: every step; None (default): every step until the policy knows
        IN_PLACE_LEARN_TOKENS tokens of routing in the first MoE layer (a profile's or observed), then one in
        IN_PLACE_OBSERVE_EVERY. Hit rates are counted over the observed steps."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"observe_every must be None or an integer >= 1, got {n!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        if n is not None and n > 1 and not self.in_place:
            raise ValueError(f"observe_every={n} needs the experts to stay in place (gpu_mode='managed'): "
                             "redirected steps are all observed")
        self.observe_every = n
        self.observe_burst = burst
        self._set_shim_observe_every(1 if n is None else n)
        self._auto_observe()

    def _set_shim_observe_every(self, n: int) -> None:
        if self._ctx is not None and self.slots is not None and \
                lib.lh_set_observe_every(self._ctx, n, self.observe_burst) != 0:
            raise RuntimeError(f"llamahot: {ffi.string(lib.lh_last_error(self._ctx)).decode()}")
        self._observing_every = n

    def _auto_observe(self) -> None:
        """observe_every None, in place: one step in IN_PLACE_OBSERVE_EVERY once the routing known (the
        profile's tokens plus those observed) reaches IN_PLACE_LEARN_TOKENS in the first MoE layer. (Not the
        layer that saw fewest: that is the model's last, where llama.cpp drops a prompt's rows without logits,
        so it sees one token a prompt; it would keep every step read for thousands of decode steps.)"""
        if not self.in_place or self.observe_every is not None or self._observing_every != 1 or self.slots is None:
            return
        # (the profile already holds the history saved into it)
        known = (self._history[0] - self._saved[0]).sum() / self.layout.n_expert_used
        if self._profile is not None:
            known += self._profile.tokens_for(self.layout)[0]
        if known >= IN_PLACE_LEARN_TOKENS:
            self._set_shim_observe_every(IN_PLACE_OBSERVE_EVERY)

    def set_observing(self, observing: bool) -> None:
        """Count and redirect (default), or leave the callback installed but idle (to measure its cost)."""
        if self._ctx is not None:
            lib.lh_set_observing(self._ctx, bool(observing))

    def open_mutations(self) -> int:
        """Graph nodes whose op the shim has changed right now: must be 0 between evals."""
        return self._counters().open_mutations

    # -- what users read -----------------------------------------------------------------
    def routing_counts(self) -> np.ndarray:
        """int64 [n_moe_layers, n_expert]: how often each expert of each MoE layer was routed to."""
        if self._final is not None:
            return self._final[0].copy()
        return self._counts.copy()

    def hot_sets(self) -> np.ndarray:
        """int32 [n_moe_layers, hot_experts]: the expert each slot serves now (-1: empty or loading)."""
        if self.slots is None:
            return np.full((self.layout.n_moe_layers, self.hot_experts), -1, dtype=np.int32)
        return self.slots.expert_of_slot.copy()

    def stats(self) -> dict:
        """Counters since creation (or the last reset()).

        hits/misses count routed (token, expert) entries of ubatches of at most prefill_bypass
        tokens, the ones llamahot computes; larger ubatches are left to llama.cpp and only counted
        in routing_counts().
        """
        if self._final is not None:
            return dict(self._final[1])
        counters = self._counters()
        hits, misses = int(self._hits.sum()), int(self._misses.sum())
        hit_rate = hits / (hits + misses) if hits + misses else 0.0
        transfers = self.slots.stats if self.slots is not None else None
        return {
            "hot_experts": self.hot_experts,
            "slot_device": self.slot_device,
            "gpu_mode": self.gpu_mode,
            "observe_every": self._observing_every,
            # In place, unread decode steps: stops after a device split's first node, which keep llama.cpp's
            # CUDA graph of the rest of the split apart from the pieces of a read step (csrc/llamahot.c).
            "split_start_stops": int(counters.split_start_stops),
            "unhooked_decodes": int(counters.unhooked_decodes),
            "policy": self.policy_name,
            "n_moe_layers": self.layout.n_moe_layers,
            "n_expert": self.layout.n_expert,
            "tokens": int(counters.tokens),
            "ubatches": int(counters.ubatches),
            "managed_nodes": int(counters.managed_nodes),
            "redirected_nodes": int(counters.redirected_nodes),
            "ffn_redirects": int(counters.ffn_redirects),
            "gpu_runs": int(counters.gpu_runs),
            "persistent_gpu_runs": int(counters.persistent_gpu_runs),
            # Single-token stops whose cold part replayed the layer's persistent CPU graph for its rows.
            "persistent_cpu_runs": int(counters.persistent_cpu_runs),
            # Host-to-device copies of their inputs: one per persistent run (its inputs lie together).
            "gpu_input_copies": int(counters.gpu_input_copies),
            "device_cold_rows": int(counters.device_cold_rows),
            # Stops whose device cold rows ran the layer's persistent device graph for that many rows.
            "persistent_dev_runs": int(counters.persistent_dev_runs),
            "cpu_runs": int(counters.cpu_runs),
            "cpu_rows": int(counters.cpu_rows),
            # CPU graphs by rows (index 8: 8 or more): how many, and their total milliseconds.
            "cpu_runs_by_rows": [int(counters.cpu_runs_by_rows[i]) for i in range(9)],
            "cpu_ms_by_rows": [counters.cpu_ns_by_rows[i] / 1e6 for i in range(9)],
            "lone_row_runs": int(counters.lone_row_runs),
            "sliced_matmuls": int(counters.sliced_matmuls),
            # Graphs of sliced nodes: when their first and last threads started (ms, summed).
            "sliced_graphs": int(counters.sliced_graphs),
            "first_thread_in_ms": counters.first_thread_in_ns / 1e6,
            "last_thread_in_ms": counters.last_thread_in_ns / 1e6,
            # ... their k-th sliced node (gate, up, down): when the last thread entered / left it.
            "sliced_node_last_in_ms": [counters.sliced_node_last_in_ns[k] / 1e6 for k in range(4)],
            "sliced_node_last_out_ms": [counters.sliced_node_last_out_ns[k] / 1e6 for k in range(4)],
            "cold_on_device": self.cold_on_device,
            # Stops' CPU graphs run on the shim's own threads (set_thread_pool).
            "pool_graphs": int(counters.pool_graphs),
            # ... of which started before the hot part's GPU submission (the workers compute the cold
            # rows while the caller submits; their cpu_compute_ms includes that submission).
            "early_pool_graphs": int(counters.early_pool_graphs),
            # Element-wise nodes of those graphs (the GLU) each thread computed on the slices of the rows
            # it computed itself, with no barrier before them.
            "co_sliced_nodes": int(counters.co_sliced_nodes),
            # Bytes the row-sliced matmuls' threads prefetched ahead of their rows (set_row_prefetch).
            "row_prefetch_bytes": int(counters.row_prefetch_bytes),
            "redirect_ms": counters.redirect_ns / 1e6,
            "cpu_compute_ms": counters.cpu_compute_ns / 1e6,
            "gpu_submit_ms": counters.gpu_submit_ns / 1e6,
            "gpu_wait_ms": counters.gpu_wait_ns / 1e6,
            # ... of which waiting for the device cold rows' expert copies (CUDA only).
            "dev_copy_wait_ms": counters.dev_copy_wait_ns / 1e6,
            # Stops that waited for copies into their slots to land, and how long (in redirect_ms).
            "fence_waits": int(counters.fence_waits),
            "fence_wait_ms": counters.fence_wait_ns / 1e6,
            # A layer's stop before its GPU part or CPU graph starts (split, graphs, gathers; in redirect_ms).
            "stop_setup_ms": counters.stop_setup_ns / 1e6,
            "expert_weights_found": int(counters.weights_known),
            "hits": hits,
            "misses": misses,
            "hit_rate": hit_rate,
            "resident_layers": self.resident_layers,
            # Resident layers never miss: the hit rate over every MoE layer of the model.
            "hit_rate_all_layers": (hit_rate * self.layout.n_moe_layers + self.resident_layers)
                                   / self.full_layout.n_moe_layers,
            "hits_per_layer": self._hits.copy(),
            "misses_per_layer": self._misses.copy(),
            "slots_total": self.layout.n_moe_layers * self.hot_experts,
            "slots_occupied": self.slots.occupied() if self.slots else 0,
            "slots_loading": transfers.pending if transfers else 0,
            "slot_bytes": self._slot_bytes(),
            "bytes_moved": transfers.bytes_moved if transfers else 0,
            "experts_loaded": transfers.experts_loaded if transfers else 0,
            "rebalances": transfers.rebalances if transfers else 0,
            "max_rebalance_ms": transfers.max_rebalance_ms if transfers else 0.0,
            "rebalance_ms": transfers.total_rebalance_ms if transfers else 0.0,
            "decode_tokens": self._decode_tokens,
            "decode_seconds": self._decode_seconds,
            "decode_tok_s": _rate(self._decode_tokens, self._decode_seconds),
            "prefill_tokens": self._prefill_tokens,
            "prefill_seconds": self._prefill_seconds,
            "prefill_tok_s": _rate(self._prefill_tokens, self._prefill_seconds),
            "shadow_rows": int(counters.shadow_rows),
            "shadow_mismatches": int(counters.shadow_mismatches),
        }

    @property
    def snapshot_name(self) -> Optional[str]:
        """Name of the shared-memory snapshot other processes read (llamahot.monitor.read_snapshots)."""
        return self._snapshot.name if self._snapshot else None

    def reset(self) -> None:
        """Zero the counters and statistics (e.g. between benchmark runs); the hot sets stay."""
        if self._final is None:
            self._fold()
            lib.lh_reset_counters(self._ctx)
            self._seen[:] = 0
        if self.slots is not None:
            self.slots.stats.reset_counters()
        self._decode_tokens = self._prefill_tokens = 0
        self._decode_seconds = self._prefill_seconds = 0.0

    def finish_transfers(self) -> None:
        """Wait for slot copies in flight (they read the model's memory: call before freeing it)."""
        self._drop_plan()
        if self.slots is not None:
            self.slots.close()

    def release(self) -> None:
        """Free slots and shim context; call only after the llama context that uses them was freed."""
        if self._ctx is None:
            return
        self._drop_plan()
        if self._planner is not None:
            self._planner.shutdown()
            self._planner = None
        self._final = (self._counts.copy(), self.stats())
        self._fold()
        if self._save_at_exit is not None:
            atexit.unregister(self._save_at_exit)
            self._save_at_exit = None
            self._save_profile_or_warn()
        if self.slots is not None:
            self.slots.close()
        if self._pages is not None:
            self._pages.close()
            self._pages = None
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None
        self._counts = self._hits = self._misses = self._last_routed = None
        lib.lh_ctx_free(self._ctx)
        self._ctx = None

    def __del__(self):
        # Reached only when the owning Llama is gone, and with it the llama context.
        self.release()

    def routing_history(self) -> np.ndarray:
        """int64 [n_moe_layers, n_expert]: all routing observed since the context was made (reset()
        zeroes routing_counts(), not this); what a routing profile records."""
        if self._ctx is not None:
            self._fold()
        return self._history.copy()

    def save_routing_profile(self, path: Optional[str | os.PathLike] = None) -> None:
        """Add the routing observed since the last save to the routing profile and write it (to
        `path`, default the routing_profile this cache was made with), atomically."""
        path = self.routing_profile if path is None else os.fspath(path)
        if path is None:
            raise ValueError("llamahot: no routing profile path: pass one, or make the Llama with routing_profile=PATH")
        profile = self._profile if self._profile is not None else RoutingProfile.empty(self.layout)
        profile.add(self.layout, self.routing_history() - self._saved)
        profile.save(path)
        self._saved = self._history.copy()
        self._profile = profile

    # -- internals -------------------------------------------------------------------------
    def _save_profile_or_warn(self) -> None:
        if not (self.routing_history() != self._saved).any():
            return   # nothing new (e.g. the model failed to load): the file stays as it is
        try:
            self.save_routing_profile()
        except OSError as exc:   # closing goes on; the previous profile file is untouched
            warnings.warn(f"llamahot: could not save the routing profile {self.routing_profile}: {exc}", stacklevel=3)

    def _fold(self) -> np.ndarray:
        """Routing since the last call (the shim's counters less what was already seen), added to the
        history; returns it."""
        delta = self._counts - self._seen
        self._seen += delta
        self._history += delta
        return delta

    def _set_prior(self, policy) -> None:
        if self._profile is not None:
            policy.set_prior(self._profile.rates(self.layout))

    def _counters(self):
        counters = ffi.new("struct lh_counters *")
        lib.lh_get_counters(self._ctx, counters)
        return counters

    def _slot_bytes(self) -> int:
        """Memory of all slots (0 before they are set up, or with K = 0); in place, the VRAM K experts
        per layer take."""
        if self.in_place:
            return self.hot_experts * self.layout.expert_matrix_bytes * self.layout.n_moe_layers if self.slots else 0
        return int(lib.lh_slot_bytes_per_layer(self._ctx)) * self.layout.n_moe_layers

    def _new_snapshot(self) -> None:
        self._snapshot = SnapshotWriter.create(os.getpid(), self.layout.n_moe_layers, self.layout.n_expert,
                                               self.hot_experts, self._model_name)
        self._publish_snapshot()

    def _publish_snapshot(self, now: float = 0.0) -> None:
        if self._snapshot is None:
            return
        self._snapshot_time = now or time.monotonic()
        t = self.slots.stats
        self._snapshot.write(
            time=time.time(),
            tokens=int(self._counters().tokens),
            hits=int(self._hits.sum()), misses=int(self._misses.sum()),
            decode_tokens=self._decode_tokens, decode_seconds=self._decode_seconds,
            prefill_tokens=self._prefill_tokens, prefill_seconds=self._prefill_seconds,
            bytes_moved=t.bytes_moved, rebalances=t.rebalances, max_rebalance_ms=t.max_rebalance_ms,
            slots_loading=t.pending,
            slot_bytes=self._slot_bytes(),
            hits_per_layer=self._hits, misses_per_layer=self._misses,
            expert_of_slot=self.slots.expert_of_slot, routing_counts=self._counts,
        )


def _save_profile_at_exit(cache_ref) -> None:
    cache = cache_ref()
    if cache is not None and cache._ctx is not None:
        cache._save_profile_or_warn()


def _int64_view(pointer, n: int) -> np.ndarray:
    return np.frombuffer(ffi.buffer(pointer, n * 8), dtype=np.int64)


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0
