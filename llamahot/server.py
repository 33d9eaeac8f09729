"""An OpenAI-compatible server with hot experts: llama_cpp.server, with llamahot.Llama as its model.

    llamahot serve MODEL.gguf --hot-experts 44 [--port 8000]
    python -m llamahot.server --model MODEL.gguf --hot_experts 44     (llama_cpp.server's own flags too)

Everything of llama_cpp.server stays as it is (routes, settings, config files); the model settings
gain llamahot's options, and the server's model proxy builds llamahot.Llama instead of
llama_cpp.Llama. Needs `pip install llamahot[server]`.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Iterator, Optional

try:
    import llama_cpp.server.app as server_app
    import llama_cpp.server.model as server_model
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from pydantic import Field
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        f"llamahot's server needs llama-cpp-python's server dependencies ({exc}); "
        "install them with `pip install llamahot[server]`."
    ) from exc

import llamahot


class HotModelSettings(ModelSettings):
    """llama_cpp.server's model settings plus llamahot's (None: a plain llama_cpp.Llama)."""

    hot_experts: Optional[int] = Field(default=None, ge=0, description="Hot-expert slots per MoE layer.")
    rebalance_interval: Optional[int] = Field(default=None, ge=1, description="Tokens between rebalances of the hot "
                                              "set (default: 4, or 64 with gpu_mode 'managed').")
    prefill_bypass: int = Field(default=32, ge=0, description="Larger ubatches are left to llama.cpp.")
    slot_device: str = Field(default="auto", description="'auto', 'cuda' or 'host'.")
    gpu_mode: Optional[str] = Field(default=None, description="With CUDA: 'managed' (experts in place in CUDA managed "
                                    "memory) or 'redirect' (VRAM slots, cold experts on the CPU); default: 'managed' "
                                    "where the GPU supports it, else 'redirect'.")
    policy: str = Field(default="decayed", description="'decayed', 'lru' or 'window-lfu'.")
    resident_layers: int = Field(default=0, ge=0,
                                 description="Keep every expert of the last N MoE layers on the GPU; slots for the rest.")
    cold_on_device: Optional[float] = Field(default=None, ge=0.0, le=1.0,
                                            description="GPU slots: share of a layer's cold experts computed on the GPU "
                                                        "(gpu_mode 'redirect'; default: 0.34 with CUDA slots, else 0).")
    routing_profile: Optional[str] = Field(default=None, description="A routing profile file: the hot set at start, "
                                           "a prior for the policy, updated when the server stops.")


@contextlib.contextmanager
def _llamahot_as_llama(settings: HotModelSettings) -> Iterator[None]:
    """llama_cpp.server builds its model with `llama_cpp.Llama(...)` (after 200 lines of settings
    handling we do not want to copy): let that name build a llamahot.Llama during the load."""
    original = server_model.llama_cpp.Llama
    server_model.llama_cpp.Llama = functools.partial(
        llamahot.Llama, hot_experts=settings.hot_experts, rebalance_interval=settings.rebalance_interval,
        prefill_bypass=settings.prefill_bypass, slot_device=settings.slot_device, policy=settings.policy,
        resident_layers=settings.resident_layers, cold_on_device=settings.cold_on_device, gpu_mode=settings.gpu_mode,
        routing_profile=settings.routing_profile)
    try:
        yield
    finally:
        server_model.llama_cpp.Llama = original


class HotLlamaProxy(server_model.LlamaProxy):
    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings):
        if not isinstance(settings, HotModelSettings) or settings.hot_experts is None:
            return server_model.LlamaProxy.load_llama_from_model_settings(settings)
        with _llamahot_as_llama(settings):
            return server_model.LlamaProxy.load_llama_from_model_settings(settings)


def create_app(server_settings: Optional[ServerSettings] = None,
               model_settings: Optional[list[HotModelSettings]] = None):
    """llama_cpp.server's FastAPI app serving llamahot models."""
    server_app.LlamaProxy = HotLlamaProxy  # the name create_app's set_llama_proxy() instantiates
    return server_app.create_app(server_settings=server_settings or ServerSettings(),
                                 model_settings=model_settings)


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, **model_options) -> None:
    import uvicorn

    settings = HotModelSettings(model=model, **model_options)
    app = create_app(ServerSettings(host=host, port=port), [settings])
    uvicorn.run(app, host=host, port=port)


class HotSettings(ServerSettings, HotModelSettings):
    """Server and model settings in one, for the command line (as llama_cpp.server's Settings)."""


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m llamahot.server`: llama_cpp.server's command line with llamahot's model options."""
    import argparse

    import uvicorn
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args_from_model(parser, HotSettings)
    settings = parse_model_from_args(HotSettings, parser.parse_args(argv))
    app = create_app(ServerSettings.model_validate(settings), [HotModelSettings.model_validate(settings)])
    uvicorn.run(app, host=settings.host, port=int(settings.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
