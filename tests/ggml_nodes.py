"""Test-only: read ggml graph nodes from a Python eval callback, independently of the shim."""
from __future__ import annotations

import ctypes

import numpy as np
import llama_cpp

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of ggml 0.25.3 (csrc/vendor/include/ggml.h)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def tensor_array(t: GgmlTensor) -> np.ndarray:
    """Copy a contiguous 2-D F32/I32 host tensor into numpy, shape [ne1, ne0]."""
    dtype = {GGML_TYPE_F32: np.float32, GGML_TYPE_I32: np.int32}[t.type]
    ne0, ne1 = t.ne[0], t.ne[1]
    rows = []
    for r in range(ne1):
        buf = (ctypes.c_char * (ne0 * np.dtype(dtype).itemsize)).from_address(t.data + r * t.nb[1])
        rows.append(np.frombuffer(bytes(buf), dtype=dtype))
    return np.stack(rows)


class NodeRecorder:
    """An application eval callback that copies the named nodes of every layer as they are computed.

    `prefixes` are node names without the "-<layer>" suffix, e.g. "ffn_moe_topk".
    Recorded arrays: self.records[prefix][layer] -> list of [n_tokens, ne0] arrays, one per ubatch.
    """

    def __init__(self, prefixes: tuple[str, ...]):
        self.prefixes = prefixes
        self.records: dict[str, dict[int, list[np.ndarray]]] = {p: {} for p in prefixes}
        self.asked = 0
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _match(self, name: str):
        prefix, _, layer = name.rpartition("-")
        if prefix in self.prefixes and layer.isdigit():
            return prefix, int(layer)
        return None

    def _on_node(self, t_ptr, ask, user_data):
        t = GgmlTensor.from_address(t_ptr)
        hit = self._match(t.name.decode(errors="replace"))
        if ask:
            self.asked += 1
            return hit is not None
        if hit is not None:
            prefix, layer = hit
            self.records[prefix].setdefault(layer, []).append(tensor_array(t))
        return True

    def stacked(self, prefix: str) -> dict[int, np.ndarray]:
        """All recorded ubatches of each layer, concatenated over tokens."""
        return {layer: np.concatenate(arrs) for layer, arrs in sorted(self.records[prefix].items())}
