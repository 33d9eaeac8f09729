"""Does ggml's scheduler eval callback by itself slow a GPU decode? Stock all-on-GPU with and
without an idle C callback (one that never stops), and llama.cpp's CUDA-graph debug messages
counted for each.

    python benchmarks/gpu/callback_probe.py MODEL.gguf [--tokens N]

Run it once plainly and once with GGML_CUDA_DISABLE_GRAPHS=1 to see what the graphs are worth, and
with LD_PRELOAD of benchmarks/gpu/cuda_calls.c (see there) for the CUDA calls each token makes.
The callback is C (compiled here with cc), not Python: a Python callback costs microseconds per
node and would measure itself.
"""
from __future__ import annotations

import collections
import ctypes
import os
import re
import subprocess
import sys
import tempfile

import llama_cpp

from llamahot.benchmark import decode_rate

IDLE_CALLBACK_C = r"""
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include "ggml.h"

bool idle_callback(void * t, bool ask, void * ud) { return false; }

/* The node properties ggml-cuda compares to decide whether a captured graph still holds (see
 * ggml_cuda_graph_update_required): which of them change from one token to the next? */
struct props {
    struct ggml_tensor node;
    void * src_data[GGML_MAX_SRC];
    int64_t src_ne[GGML_MAX_SRC][GGML_MAX_DIMS];
    size_t src_nb[GGML_MAX_SRC][GGML_MAX_DIMS];
};
#define MAX_NODES 65536
static struct props previous[MAX_NODES];
static int n_seen, n_previous;
static long changed_nodes, compared_nodes;
static long field_changes[16];
static char examples[4096];
static const char * FIELDS[] = {"type", "buffer", "ne", "nb", "op", "op_params", "flags", "src", "view_src",
                                "view_offs", "data", "name", "extra", "padding", "src data", "src ne/nb"};
static const size_t OFFSETS[] = {offsetof(struct ggml_tensor, type), offsetof(struct ggml_tensor, buffer),
    offsetof(struct ggml_tensor, ne), offsetof(struct ggml_tensor, nb), offsetof(struct ggml_tensor, op),
    offsetof(struct ggml_tensor, op_params), offsetof(struct ggml_tensor, flags), offsetof(struct ggml_tensor, src),
    offsetof(struct ggml_tensor, view_src), offsetof(struct ggml_tensor, view_offs), offsetof(struct ggml_tensor, data),
    offsetof(struct ggml_tensor, name), offsetof(struct ggml_tensor, extra), offsetof(struct ggml_tensor, padding),
    sizeof(struct ggml_tensor), offsetof(struct props, src_ne), sizeof(struct props)};

bool diff_callback(struct ggml_tensor * t, bool ask, void * ud) {
    if (!ask || n_seen >= MAX_NODES) {
        return false;
    }
    struct props now;
    memset(&now, 0, sizeof(now));
    memcpy(&now.node, t, sizeof(*t));
    for (int j = 0; j < GGML_MAX_SRC; j++) {
        if (t->src[j]) {
            now.src_data[j] = t->src[j]->data;
            memcpy(now.src_ne[j], t->src[j]->ne, sizeof(now.src_ne[j]));
            memcpy(now.src_nb[j], t->src[j]->nb, sizeof(now.src_nb[j]));
        }
    }
    if (n_seen < n_previous) {
        compared_nodes++;
        if (memcmp(&previous[n_seen], &now, sizeof(now)) != 0) {
            changed_nodes++;
            const char * a = (const char *) &previous[n_seen], * b = (const char *) &now;
            for (int f = 0; f < 16; f++) {
                if (memcmp(a + OFFSETS[f], b + OFFSETS[f], OFFSETS[f + 1] - OFFSETS[f]) != 0) {
                    field_changes[f]++;
                    size_t used = strlen(examples);
                    if (used < sizeof(examples) - 128) {
                        snprintf(examples + used, sizeof(examples) - used, "%s:%s; ", t->name, FIELDS[f]);
                    }
                }
            }
        }
    }
    previous[n_seen++] = now;
    return false;
}

void diff_token_end(void) { n_previous = n_seen; n_seen = 0; }
void diff_clear(void) { changed_nodes = compared_nodes = 0; memset(field_changes, 0, sizeof(field_changes)); examples[0] = 0; }

void diff_report(char * out, size_t n) {
    int used = snprintf(out, n, "nodes compared %ld, changed %ld;", compared_nodes, changed_nodes);
    for (int f = 0; f < 16; f++) {
        if (field_changes[f]) {
            used += snprintf(out + used, n - used, " %s %ld", FIELDS[f], field_changes[f]);
        }
    }
    snprintf(out + used, n - used, " | first: %.1500s", examples);
}
"""
DEBUG_MESSAGES = ("warmup complete", "warmup reset", "reused", "update failed", "disabling CUDA graphs")


def probe_library() -> ctypes.CDLL:
    folder = tempfile.mkdtemp()
    source, library = os.path.join(folder, "probe.c"), os.path.join(folder, "probe.so")
    with open(source, "w") as f:
        f.write(IDLE_CALLBACK_C)
    headers = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "vendor", "include")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-I", headers, "-o", library, source], check=True)
    return ctypes.CDLL(library)


def address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


class WithCallback(llama_cpp.Llama):
    """Stock llama_cpp.Llama with a C eval callback installed on its context."""

    def __init__(self, path: str, *, callback: int | None, **kwargs):
        self._callback = callback
        super().__init__(path, **kwargs)

    @property
    def context_params(self):
        return self.__dict__["context_params"]

    @context_params.setter
    def context_params(self, params):
        if self._callback is not None:
            params.cb_eval = llama_cpp.ggml_backend_sched_eval_callback(self._callback)
            params.cb_eval_user_data = None
        self.__dict__["context_params"] = params


def count_debug_messages(log: list[str]) -> dict:
    counts = collections.Counter()
    for line in log:
        for message in DEBUG_MESSAGES:
            if message in line:
                counts[message] += 1
    return dict(counts)


def main() -> int:
    path = sys.argv[1]
    n = int(sys.argv[sys.argv.index("--tokens") + 1]) if "--tokens" in sys.argv else 64
    log: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        log.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p())
    graphs = "off (GGML_CUDA_DISABLE_GRAPHS)" if os.environ.get("GGML_CUDA_DISABLE_GRAPHS") else "on"
    probe = probe_library()
    # CUDA runtime calls per token, where benchmarks/gpu/cuda_calls.c is preloaded.
    preload = os.environ.get("LD_PRELOAD", "")
    calls = ctypes.CDLL(preload) if "cuda_calls" in preload else None
    for name, callback in (("stock GPU", None), ("stock GPU + idle C callback", address(probe.idle_callback))):
        llm = WithCallback(path, callback=callback, n_ctx=1024, n_threads=16, n_gpu_layers=-1, verbose=False)
        decode_rate(llm, 16)
        del log[:]
        rates = [decode_rate(llm, n) for _ in range(3)]
        rates.sort()
        print(f"graphs {graphs}: {name}: {rates[1]:.1f} tok/s (median of 3 x {n}); "
              f"debug messages during them: {count_debug_messages(log)}", flush=True)
        if calls is not None:
            llm.reset()
            llm.eval(llm.tokenize(b"def main():"))
            llm.eval([100])
            calls.cuda_calls_clear()
            for token in range(n):
                llm.eval([101 + token])
            calls.cuda_calls_report(name.encode(), n)
        llm.close()

    # Which node properties change between tokens (the diff callback never stops either).
    llm = WithCallback(path, callback=address(probe.diff_callback), n_ctx=1024, n_threads=16, n_gpu_layers=-1,
                       verbose=False)
    llm.reset()
    llm.eval(llm.tokenize(b"def main():"))
    for token in range(9):
        probe.diff_token_end()
        if token == 1:
            probe.diff_clear()  # from here on, single-token decode against single-token decode
        llm.eval([100 + token])
    report = ctypes.create_string_buffer(8192)
    probe.diff_report(report, ctypes.c_size_t(len(report)))
    print("node properties changing between single-token decodes:", report.value.decode(), flush=True)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
