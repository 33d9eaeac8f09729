"""The per-context hot-expert cache: owns the shim context and reports what it saw.

One HotCache per llamahot.Llama. It is created before the llama context (its callback and
user_data go into the context params) and released after the context is freed.
"""
from __future__ import annotations

import ctypes
from typing import Any, Optional

import numpy as np

from llamahot._shim import ffi, lib
from llamahot.model_info import EXPERT_TENSOR_PATTERN, MoELayout


class HotCache:
    """Routing counters and statistics of one llamahot context."""

    def __init__(self, layout: MoELayout, *, hot_experts: int, rebalance_interval: int,
                 prefill_bypass: int, slot_device: str):
        self.layout = layout
        self.hot_experts = hot_experts
        self.rebalance_interval = rebalance_interval
        self.prefill_bypass = prefill_bypass
        self.slot_device = slot_device

        blk_to_moe = layout.blk_to_moe()
        ctx = lib.lh_ctx_new(layout.n_blocks, ffi.from_buffer("int32_t[]", blk_to_moe),
                             layout.n_moe_layers, layout.n_expert)
        if ctx == ffi.NULL:
            raise MemoryError("llamahot: could not allocate the shim context")
        self._ctx = ctx
        n = layout.n_moe_layers * layout.n_expert
        self._counts_view = np.frombuffer(ffi.buffer(lib.lh_routing_counts(ctx), n * 8), dtype=np.int64)
        self._counts_view = self._counts_view.reshape(layout.n_moe_layers, layout.n_expert)
        self._final: Optional[tuple[np.ndarray, dict]] = None  # snapshot kept after release()

        # Placement of every routed-expert tensor in host memory (what `-ot exps=CPU` does).
        self._override_pattern = ffi.new("char[]", EXPERT_TENSOR_PATTERN.encode())
        self._overrides = ffi.new("struct llama_model_tensor_buft_override[2]")
        self._overrides[0].pattern = self._override_pattern
        self._overrides[0].buft = lib.ggml_backend_cpu_buffer_type()

        self._user_callback: Any = None  # keeps an application's ctypes callback alive
        self._decode_tokens = 0
        self._decode_seconds = 0.0
        self._prefill_tokens = 0
        self._prefill_seconds = 0.0

    # -- wiring into llama.cpp (used by llamahot.Llama) ------------------------------------
    @property
    def tensor_buft_overrides_address(self) -> int:
        return int(ffi.cast("uintptr_t", self._overrides))

    @property
    def eval_callback_address(self) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, "lh_eval_callback")))

    @property
    def user_data_address(self) -> int:
        return int(ffi.cast("uintptr_t", self._ctx))

    def chain_user_callback(self, callback: Any, user_data: Optional[int] = None) -> None:
        """Chain an application's eval callback (a ctypes ggml_backend_sched_eval_callback)."""
        address = ctypes.cast(callback, ctypes.c_void_p).value
        self._user_callback = callback
        lib.lh_set_user_callback(self._ctx, ffi.cast("ggml_backend_sched_eval_callback", address),
                                 ffi.cast("void *", user_data or 0))

    def record_eval(self, n_tokens: int, seconds: float) -> None:
        """Time of one Llama.eval call: one token is a decode step, more are prompt processing."""
        if n_tokens == 1:
            self._decode_tokens += n_tokens
            self._decode_seconds += seconds
        else:
            self._prefill_tokens += n_tokens
            self._prefill_seconds += seconds

    # -- what users read -----------------------------------------------------------------
    def routing_counts(self) -> np.ndarray:
        """int64 [n_moe_layers, n_expert]: how often each expert of each MoE layer was routed to."""
        if self._final is not None:
            return self._final[0].copy()
        return self._counts_view.copy()

    def stats(self) -> dict:
        """Counters since creation (or the last reset()): tokens, ubatches, decode/prefill speed."""
        if self._final is not None:
            return dict(self._final[1])
        counters = ffi.new("struct lh_counters *")
        lib.lh_get_counters(self._ctx, counters)
        return {
            "hot_experts": self.hot_experts,
            "slot_device": self.slot_device,
            "n_moe_layers": self.layout.n_moe_layers,
            "n_expert": self.layout.n_expert,
            "tokens": int(counters.tokens),
            "ubatches": int(counters.ubatches),
            "managed_nodes": int(counters.managed_nodes),
            "expert_weights_found": int(counters.weights_known),
            "decode_tokens": self._decode_tokens,
            "decode_seconds": self._decode_seconds,
            "decode_tok_s": _rate(self._decode_tokens, self._decode_seconds),
            "prefill_tokens": self._prefill_tokens,
            "prefill_seconds": self._prefill_seconds,
            "prefill_tok_s": _rate(self._prefill_tokens, self._prefill_seconds),
        }

    def set_observing(self, observing: bool) -> None:
        """Count routing (default), or leave the callback installed but idle (for measuring its cost)."""
        if self._ctx is not None:
            lib.lh_set_observing(self._ctx, bool(observing))

    def reset(self) -> None:
        """Zero the routing counts and statistics (e.g. between benchmark runs)."""
        if self._final is None:
            lib.lh_reset_counters(self._ctx)
        self._decode_tokens = self._prefill_tokens = 0
        self._decode_seconds = self._prefill_seconds = 0.0

    def release(self) -> None:
        """Free the shim context; call only after the llama context that uses it was freed."""
        if self._ctx is None:
            return
        self._final = (self._counts_view.copy(), self.stats())
        self._counts_view = None
        lib.lh_ctx_free(self._ctx)
        self._ctx = None

    def __del__(self):
        # Reached only when the owning Llama is gone, and with it the llama context.
        self.release()


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0

