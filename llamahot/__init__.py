"""llamahot: keep the hot experts of every MoE layer in VRAM, on stock llama-cpp-python.

    from llamahot import Llama
    llm = Llama("model.gguf", hot_experts=44)
"""
from llamahot._shim import REQUIRED_LLAMA_CPP_PYTHON, VersionMismatchError  # checks versions at import
from llamahot.hot_cache import HotCache
from llamahot.llama import Llama
from llamahot.model_info import MoELayout, read_moe_layout

__version__ = "0.1.0"
__all__ = ["Llama", "HotCache", "MoELayout", "read_moe_layout", "VersionMismatchError",
           "REQUIRED_LLAMA_CPP_PYTHON", "__version__"]
