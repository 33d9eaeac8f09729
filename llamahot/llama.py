"""llamahot.Llama: llama_cpp.Llama with the routed experts of a MoE model managed by llamahot."""
from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import llama_cpp

from llamahot.hot_cache import HotCache
from llamahot.model_info import read_moe_layout

SLOT_DEVICES = ("auto", "cuda", "host")
GPU_MODES = ("managed", "redirect")
# Read by ggml-cuda at each allocation: set, its buffers are CUDA managed memory (cudaMallocManaged).
UNIFIED_MEMORY_ENV = "GGML_CUDA_ENABLE_UNIFIED_MEMORY"
EMULATED_GPU = "emulated-gpu"  # test-only: the GPU code path on a CPU backend (tests/test_emulated_gpu.py)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _resolve_slot_device(slot_device: Any) -> str:
    if slot_device == EMULATED_GPU:
        return slot_device
    if slot_device not in SLOT_DEVICES:
        raise ValueError(f"slot_device must be one of {', '.join(map(repr, SLOT_DEVICES))}, got {slot_device!r}")
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    if slot_device == "cuda" and not gpu:
        raise RuntimeError(
            "slot_device='cuda' needs a CUDA build of llama-cpp-python and a visible NVIDIA GPU, but llama.cpp "
            "reports no GPU device. If `nvidia-smi` shows a GPU, reinstall llama-cpp-python with CUDA: "
            "CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36 "
            "(then reinstall llamahot). Or use slot_device='host'."
        )
    if slot_device == "auto" and not gpu:
        warnings.warn(
            "llamahot: llama.cpp reports no GPU device, so hot experts use host slots (in RAM): exact, but no "
            "faster than llama_cpp.Llama. For a speed-up install a CUDA build of llama-cpp-python "
            "(CMAKE_ARGS=\"-DGGML_CUDA=on\"); pass slot_device='host' to silence this.",
            stacklevel=3,
        )
        return "host"
    if slot_device == "auto":
        slot_device = "cuda"
    if slot_device == "cuda":
        try:
            from cuda.bindings import runtime  # noqa: F401  (moves experts into VRAM slots)
        except ImportError as exc:
            raise RuntimeError(
                "slot_device='cuda' moves experts with cuda-python, which is not installed: "
                "pip install cuda-python (its major version must match your CUDA driver, e.g. "
                "\"cuda-python<13\" for CUDA 12)."
            ) from exc
    return slot_device


def _set_env(name: str, value: str) -> Callable[[], None]:
    """Set an environment variable; returns a function that restores it (once)."""
    before = os.environ.get(name)
    os.environ[name] = value
    restored = False

    def restore() -> None:
        nonlocal restored
        if not restored:
            restored = True
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before
    return restore


def managed_memory_supported() -> bool:
    """Whether the current CUDA device can run the experts in place: CUDA managed memory that the GPU
    and the CPU may access concurrently (Linux, Pascal or newer; not Windows or WSL)."""
    from cuda.bindings import runtime as cudart

    err, device = cudart.cudaGetDevice()
    if err != cudart.cudaError_t.cudaSuccess:
        return False
    err, value = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrConcurrentManagedAccess, device)
    return err == cudart.cudaError_t.cudaSuccess and value == 1


def _resolve_gpu_mode(gpu_mode: Any, slot_device: str, hot_experts: int = 1,
                      cold_on_device: Any = None) -> tuple[Optional[str], str]:
    """The gpu_mode to use, and why when it was not asked for (for the load message)."""
    if gpu_mode is not None and gpu_mode not in GPU_MODES:
        raise ValueError(f"gpu_mode must be None or one of {', '.join(map(repr, GPU_MODES))}, got {gpu_mode!r}")
    if slot_device == EMULATED_GPU:
        return gpu_mode or "redirect", ""   # tests: either path, the stops' by default
    if slot_device != "cuda":
        return None, ""   # host slots: nothing on a GPU to choose
    if gpu_mode == "managed" and not managed_memory_supported():
        raise RuntimeError(
            "gpu_mode='managed' keeps the experts in CUDA managed memory, which needs a GPU with concurrent "
            "managed access (Linux, Pascal or newer); this GPU reports none (Windows or WSL?). Use "
            "gpu_mode='redirect', or leave gpu_mode unset to get it.")
    if gpu_mode is not None:
        return gpu_mode, ""
    # The default: experts in place, faster than redirect in decode and prefill wherever measured
    # (benchmarks/RESULTS.md, sessions 19-21), except where there is nothing hot to keep.
    if cold_on_device:
        return "redirect", "cold_on_device is an option of gpu_mode='redirect'"
    if hot_experts == 0:
        return "redirect", ("no hot experts: the CPU computes cold experts faster than the GPU reads them "
                            "over PCIe")
    if not managed_memory_supported():
        return "redirect", "this GPU has no concurrent managed access, which gpu_mode='managed' needs"
    return "managed", ""


class Llama(llama_cpp.Llama):
    """Drop-in replacement for llama_cpp.Llama that keeps the hot experts of every MoE layer in slots.

    New keyword arguments (everything else is llama_cpp.Llama's):
      hot_experts: slots per MoE layer (0 <= K <= n_expert): the experts of each layer kept in VRAM.
        None behaves exactly like llama_cpp.Llama: no expert placement, no callback. With K set,
        everything but the routed experts goes on the GPU (n_gpu_layers=-1 by default), the routed
        experts as gpu_mode says, and routing is observed through llama.cpp's eval callback.
      rebalance_interval: tokens between rebalances of the hot set (default None: 4, or 64 with
        gpu_mode="managed", where moving an expert costs more; benchmarks/RESULTS.md).
      prefill_bypass: ubatches with more tokens than this are left to llama.cpp (default 32).
      slot_device: "auto" (CUDA if llama-cpp-python was built with it, else host), "cuda" or "host".
        With "host" the routed experts lie in host memory (like `-ot exps=CPU`) and the hot ones'
        matmuls run on copies in host slots: exact, for tests and machines without a GPU.
      gpu_mode: with CUDA, how the experts are kept (default None: "managed" where the GPU supports it,
        else "redirect"; also "redirect" with hot_experts=0 or cold_on_device > 0; the load message says
        which and why):
        "managed": the routed-expert tensors stay on the GPU in CUDA managed memory, llama.cpp computes
          every expert there in its own CUDA graphs, and llamahot moves the pages: the K hot experts of
          each layer in VRAM, the cold ones in host memory, which the GPU reads over PCIe. Outputs are
          bit-identical to llama_cpp.Llama with the whole model on the GPU; with a routing_profile,
          decode 5-15 % faster than "redirect" and prefill ~1.5x stock experts-in-RAM, also with a
          model larger than the free VRAM (benchmarks/RESULTS.md, sessions 19-21). Needs a GPU with
          concurrent managed access (Linux; not Windows or WSL).
        "redirect": the routed experts in host memory (like `-ot exps=CPU`), the hot ones copied to VRAM
          slots, and each MoE layer's matmuls redirected there through the eval callback; the CPU
          computes the cold ones. Outputs are those of llama_cpp.Llama with the experts in RAM.
      policy: which experts are hot: "decayed" (default: decayed routing counts with hysteresis),
        "lru" or "window-lfu".
      resident_layers: keep every expert of the last N MoE layers on the GPU, where llama.cpp
        computes them as usual (like the layers `--n-cpu-moe` leaves on the GPU); the other layers
        get `hot_experts` slots each (default 0). Each resident layer costs n_expert slots of VRAM
        but removes that layer's trip through the CPU, so with a large VRAM budget a mix beats
        slots everywhere (benchmarks/RESULTS.md).
      cold_on_device: with gpu_mode="redirect", the share (0..1) of each layer's cold experts that a
        single-token decode step copies to the GPU and computes there while the CPU computes the
        rest (default None: 0.34 with CUDA slots, one row of a stop with 2 to 4 cold rows; else 0).
        Measured in benchmarks/RESULTS.md.
      plan_ahead: let the policy plan each decode step's loads in a worker thread while llama
        decodes the next token, so that after a step only the copies are issued (default False).
        The hot set then follows the routing one rebalance later; prompts still rebalance at once.
        The planner takes a core: give llama one thread fewer than you have cores.
      routing_profile: a file of long-run routing counts (llamahot.profile; default None: none). If
        it exists, the hot set is loaded from it before the first token and the policy keeps it as a
        prior beside the routing it observes; when the Llama closes, the routing it observed is added
        and the file rewritten (atomically). Make one from text with `llamahot profile MODEL TEXT OUT`.
        Most useful with gpu_mode="managed", whose sticky policy otherwise needs hundreds of tokens to
        settle (benchmarks/RESULTS.md, session 19).
      load_progress: a function called with the fraction of the model loaded (0.0 .. 1.0).
      cb_eval, cb_eval_user_data: an application's own ggml_backend_sched_eval_callback (a ctypes
        llama_cpp.ggml_backend_sched_eval_callback); llamahot owns the context's callback and chains it.
    """

    def __init__(
        self,
        model_path: str,
        *,
        hot_experts: Optional[int] = None,
        rebalance_interval: Optional[int] = None,
        prefill_bypass: int = 32,
        slot_device: str = "auto",
        policy: str = "decayed",
        resident_layers: int = 0,
        cold_on_device: Optional[float] = None,
        plan_ahead: bool = False,
        gpu_mode: Optional[str] = None,
        routing_profile: Optional[str | os.PathLike] = None,
        load_progress: Optional[Callable[[float], None]] = None,
        cb_eval: Any = None,
        cb_eval_user_data: Optional[int] = None,
        **kwargs: Any,
    ):
        self.hot_cache: Optional[HotCache] = None
        self._user_cb_eval = (cb_eval, cb_eval_user_data)
        self._load_progress = None
        # Set for gpu_mode="managed" (a list, not an attribute: the callback must not hold self alive).
        restore_env: list[Optional[Callable[[], None]]] = [None]
        if hot_experts is not None or load_progress is not None:
            def report(fraction: float, _user_data) -> bool:
                if fraction >= 1.0 and restore_env[0] is not None:
                    restore_env[0]()   # the weights are loaded: the context's buffers are plain VRAM
                if load_progress is not None:
                    load_progress(float(fraction))
                return True  # go on loading
            self._load_progress = llama_cpp.llama_progress_callback(report)  # kept alive with self
        if hot_experts is None and routing_profile is not None:
            raise ValueError("routing_profile needs hot_experts: without it this Llama observes no routing "
                             "(pass hot_experts=K, e.g. 0 to record a profile without slots)")
        if hot_experts is not None:
            _check_int("hot_experts", hot_experts, 0)
            if rebalance_interval is not None:
                _check_int("rebalance_interval", rebalance_interval, 1)
            _check_int("prefill_bypass", prefill_bypass, 0)
            _check_int("resident_layers", resident_layers, 0)
            device = _resolve_slot_device(slot_device)
            mode, mode_why = _resolve_gpu_mode(gpu_mode, device, hot_experts, cold_on_device)
            layout = read_moe_layout(model_path)
            if hot_experts > layout.n_expert:
                raise ValueError(
                    f"hot_experts={hot_experts} is more than the {layout.n_expert} experts per layer of "
                    f"{layout.path}; use 0..{layout.n_expert}."
                )
            self.hot_cache = HotCache(layout, hot_experts=hot_experts, rebalance_interval=rebalance_interval,
                                      prefill_bypass=prefill_bypass, slot_device=device, policy=policy,
                                      resident_layers=resident_layers, cold_on_device=cold_on_device,
                                      plan_ahead=plan_ahead, gpu_mode=mode, routing_profile=routing_profile)
            layout = self.hot_cache.layout
            if cb_eval is not None:
                self.hot_cache.chain_user_callback(cb_eval, cb_eval_user_data)
            kwargs.setdefault("n_gpu_layers", -1)
            if device == "cuda":
                # Redirect: experts then load into pinned host memory (CUDA_Host) instead of a pageable
                # mmap, so slot copies run at full PCIe speed and truly asynchronously. Managed: no mmap'd
                # copy of the file stays in the page cache beside the experts' host pages.
                kwargs.setdefault("use_mmap", False)
            if kwargs.get("verbose", True):
                print(
                    f"llamahot: {layout.arch}, {self.hot_cache.full_layout.n_moe_layers} MoE layers x {layout.n_expert} experts "
                    f"({layout.n_expert_used} used); routed-expert tensors ({layout.expert_tensor_bytes / 2**20:.1f} MiB, "
                    f"of {layout.n_moe_layers} layers) placed in "
                    f"{'CUDA managed memory' if mode == 'managed' else 'host memory'}; hot_experts={hot_experts}, "
                    f"resident_layers={resident_layers}, slot_device={device}"
                    f"{f', gpu_mode={mode}' if mode else ''}{f' ({mode_why})' if mode_why else ''}",
                    file=sys.stderr,
                )
        if self.hot_cache is not None and self.hot_cache.in_place:
            if self.hot_cache.slot_device == "cuda":
                self.hot_cache.measure_vram_in_place(os.path.getsize(model_path))
            # The model's CUDA weight buffers in managed memory, so llamahot can move expert pages.
            restore_env[0] = _set_env(UNIFIED_MEMORY_ENV, "1")
        try:
            super().__init__(model_path, **kwargs)
        finally:
            if restore_env[0] is not None:
                restore_env[0]()
        if self.hot_cache is not None:
            self.hot_cache.attach(self.ctx, self.model, self.context_params.n_threads)

    # llama_cpp.Llama.__init__ builds its params structs and loads the model in one go, with no
    # hook in between. These two properties catch the moment each struct is first assigned and
    # add what llamahot needs, so nothing of llama_cpp's own setup is copied here.
    @property
    def model_params(self) -> llama_cpp.llama_model_params:
        return self.__dict__["model_params"]

    @model_params.setter
    def model_params(self, params: llama_cpp.llama_model_params) -> None:
        if self._load_progress is not None:
            params.progress_callback = self._load_progress
        if self.hot_cache is not None:
            if self.hot_cache.tensor_buft_overrides_address is not None:
                params.tensor_buft_overrides = self.hot_cache.tensor_buft_overrides_address
            # No extra CPU buffer types (repacked weights, AMX): device slots copy expert slabs as they
            # are, and on a CPU with AMX llama-cpp-python 0.3.36 itself crashes with them (a segfault in
            # ggml_backend_amx_mul_mat on a Q8_0 model, an abort at a deepseek2 model's first context).
            params.use_extra_bufts = False
        self.__dict__["model_params"] = params

    @property
    def context_params(self) -> llama_cpp.llama_context_params:
        return self.__dict__["context_params"]

    @context_params.setter
    def context_params(self, params: llama_cpp.llama_context_params) -> None:
        user_cb, user_data = self._user_cb_eval
        if self.hot_cache is not None:
            self._cb_eval_ref = llama_cpp.ggml_backend_sched_eval_callback(self.hot_cache.eval_callback_address)
            params.cb_eval = self._cb_eval_ref
            params.cb_eval_user_data = self.hot_cache.user_data_address
        elif user_cb is not None:
            params.cb_eval = user_cb
            params.cb_eval_user_data = user_data
        self.__dict__["context_params"] = params

    def eval(self, tokens: Sequence[int]) -> None:
        if self.hot_cache is None:
            return super().eval(tokens)
        start = time.perf_counter()
        self.hot_cache.before_eval(len(tokens))
        try:
            super().eval(tokens)
        finally:
            # A decode that failed or was aborted mid-graph must not leave a skipped node behind:
            # llama.cpp reuses graphs.
            self.hot_cache.end_of_eval()
        self.hot_cache.after_eval(len(tokens), time.perf_counter() - start)

    def save_routing_profile(self, path: Optional[str | os.PathLike] = None) -> None:
        """Write the routing profile now (default: to routing_profile), adding what was observed since the
        last save; close() does the same."""
        if self.hot_cache is None:
            raise ValueError("llamahot: this Llama observes no routing (hot_experts=None)")
        self.hot_cache.save_routing_profile(path)

    def close(self) -> None:
        """Free the model and context, then the shim state the context's callback pointed at."""
        if self.hot_cache is not None:
            self.hot_cache.finish_transfers()  # copies in flight read the model's expert memory
        if "_stack" in self.__dict__:
            super().close()
        if self.hot_cache is not None:
            self.hot_cache.release()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self):
        state = super().__getstate__()
        if self.hot_cache is not None:
            cache = self.hot_cache
            state.update(hot_experts=cache.hot_experts, rebalance_interval=cache.rebalance_interval,
                         prefill_bypass=cache.prefill_bypass, slot_device=cache.slot_device,
                         policy=cache.policy_name, resident_layers=cache.resident_layers,
                         cold_on_device=cache.cold_on_device, plan_ahead=cache.plan_ahead, gpu_mode=cache.gpu_mode,
                         routing_profile=cache.routing_profile)
        return state

