"""Loads the C shim against the llama.cpp libraries that llama_cpp has already loaded.

llama_cpp opens libllama (and through it libggml*) with RTLD_LOCAL on Linux, so their symbols are
not visible to other modules. The shim is compiled against the vendored headers without linking to
those libraries; here the already loaded copies are promoted to RTLD_GLOBAL (RTLD_NOLOAD: never a
second copy) before the cffi extension is imported, after checking they are the version the shim
was built for.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as _llama_lib

REQUIRED_LLAMA_CPP_PYTHON = "0.3.36"
_INSTALL_HINT = (
    f"llamahot is built for llama-cpp-python=={REQUIRED_LLAMA_CPP_PYTHON}; install it with "
    f"`pip install llama-cpp-python=={REQUIRED_LLAMA_CPP_PYTHON}` "
    "(with CMAKE_ARGS=\"-DGGML_CUDA=on\" for a GPU build), then reinstall llamahot."
)


class VersionMismatchError(ImportError):
    """The loaded llama-cpp-python is not the one llamahot's shim was compiled for."""


def _lib_dir() -> Path:
    return Path(_llama_lib._lib._name).resolve().parent


# Only the libraries whose symbols the shim calls: ggml's core, its CPU backend and llama. A GPU
# backend (libggml-cuda) carries its own static copy of the C++ runtime; made global, its copy of
# std::ostream interposed on libllama's and the next model load crashed in llama_model::print_info
# (seen on the H100 machine). The shim reaches GPU backends through ggml's registry only.
_SHIM_LIBRARIES = ("libggml-base.", "libggml.", "libggml-cpu", "libllama.")


def _promote_loaded_libraries(lib_dir: Path) -> None:
    mode = ctypes.RTLD_GLOBAL | os.RTLD_NOLOAD
    for path in sorted(lib_dir.iterdir()):
        if path.name.startswith(_SHIM_LIBRARIES) and (".so" in path.name or path.suffix == ".dylib"):
            try:
                ctypes.CDLL(str(path), mode=mode)
            except OSError:
                pass  # not loaded by llama_cpp (e.g. a backend variant it did not pick)


def _loaded_ggml_version() -> str:
    """ggml's own version string, from the (now global) library llama_cpp loaded."""
    try:
        fn = ctypes.CDLL(None).ggml_version
    except AttributeError:
        return "unknown"
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _load():
    found = getattr(llama_cpp, "__version__", "unknown")
    if found != REQUIRED_LLAMA_CPP_PYTHON:
        raise VersionMismatchError(f"found llama-cpp-python {found}. {_INSTALL_HINT}")
    lib_dir = _lib_dir()
    _promote_loaded_libraries(lib_dir)
    try:
        from llamahot._shim_c import ffi, lib
    except ImportError as exc:
        raise ImportError(
            f"llamahot's C shim could not be loaded ({exc}). Reinstall llamahot from source "
            "(`pip install --force-reinstall --no-deps .`) next to llama-cpp-python=="
            f"{REQUIRED_LLAMA_CPP_PYTHON}. In a source checkout, the uncompiled `llamahot/` folder shadows "
            "the installed package when Python runs from the checkout's root: install with "
            "`pip install -e .` or run from another directory."
        ) from exc
    built = ffi.string(lib.lh_built_ggml_version()).decode()
    loaded = _loaded_ggml_version()
    if loaded != built:
        raise VersionMismatchError(
            f"llamahot's shim was compiled for ggml {built} but llama_cpp loaded ggml {loaded} "
            f"from {lib_dir}. {_INSTALL_HINT}"
        )
    return ffi, lib


ffi, lib = _load()
