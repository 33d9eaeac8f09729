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

CDEF = """
typedef struct ggml_backend_buffer_type * ggml_backend_buffer_type_t;
typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data);

struct llama_model_tensor_buft_override {
    const char * pattern;
    ggml_backend_buffer_type_t buft;
};

ggml_backend_buffer_type_t ggml_backend_cpu_buffer_type(void);
const char * ggml_version(void);

struct lh_counters {
    int64_t ubatches;
    int64_t tokens;
    int64_t managed_nodes;
    int64_t weights_known;
};

struct lh_ctx * lh_ctx_new(int32_t n_blocks, const int32_t * blk_to_moe, int32_t n_moe_layers, int32_t n_expert);
void lh_ctx_free(struct lh_ctx * ctx);
void lh_set_user_callback(struct lh_ctx * ctx, ggml_backend_sched_eval_callback cb, void * user_data);
void lh_set_observing(struct lh_ctx * ctx, bool observing);
bool lh_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);
int64_t * lh_routing_counts(struct lh_ctx * ctx);
void lh_get_counters(const struct lh_ctx * ctx, struct lh_counters * out);
void lh_reset_counters(struct lh_ctx * ctx);
const char * lh_built_ggml_version(void);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "llamahot._shim_c",
    '#include "llama.h"\n#include "ggml-cpu.h"\n#include "llamahot.h"\n',
    sources=[str((CSRC / "llamahot.c").relative_to(ROOT))],
    include_dirs=[str(CSRC), str(VENDOR / "include")],
    define_macros=[("LH_GGML_VERSION", f'"{GGML_VERSION}"')],
    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
