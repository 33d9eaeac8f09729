"""cffi build script for the C shim (out-of-line API mode).

Run by setup.py (``cffi_modules``). The shim is compiled against the ggml/llama headers vendored
in ``csrc/vendor`` (exactly those of llama-cpp-python 0.3.36) and is not linked to llama.cpp's
libraries: ``llamahot._shim`` makes the already loaded ones global before importing it.
"""
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
VENDOR = CSRC / "vendor"
GGML_VERSION = (VENDOR / "GGML_VERSION").read_text().strip()

# Types the shim's API uses from ggml/llama, declared for cffi as opaque or exact as needed.
GGML_CDEF = """
typedef struct ggml_backend_buffer_type * ggml_backend_buffer_type_t;
typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data);

struct llama_model_tensor_buft_override {
    const char * pattern;
    ggml_backend_buffer_type_t buft;
};

ggml_backend_buffer_type_t ggml_backend_cpu_buffer_type(void);
const char * ggml_version(void);
"""


def shim_api_cdef() -> str:
    """The shim's own API, read from its header between the cdef markers (one source of truth)."""
    header = (CSRC / "llamahot.h").read_text()
    return header.split("/* cdef-begin", 1)[1].split("*/", 1)[1].split("/* cdef-end */", 1)[0]


CDEF = GGML_CDEF + shim_api_cdef()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "llamahot._shim_c",
    '#include "llama.h"\n#include "ggml-cpu.h"\n#include "llamahot.h"\n',
    sources=[str((CSRC / "llamahot.c").relative_to(ROOT))],
    include_dirs=[str(CSRC), str(VENDOR / "include")],
    define_macros=[("LH_GGML_VERSION", f'"{GGML_VERSION}"')],
    extra_compile_args=["-O2", "-std=c11", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
