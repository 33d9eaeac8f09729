"""Does an installed eval callback cost llama.cpp its CUDA graphs? Stock placements with and without
a callback that never stops the graph, optionally with GGML_CUDA_DISABLE_GRAPHS=1 (run twice).

    python benchmarks/gpu/graphs_probe.py MODEL.gguf OUT.json [--tokens 32] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import llama_cpp

sys.path.insert(0, str(Path(__file__).parent))
from bench import StockPlaced  # noqa: E402

from llamahot.benchmark import decode_rate  # noqa: E402
from llamahot.model_info import EXPERT_TENSOR_PATTERN  # noqa: E402


@llama_cpp.ggml_backend_sched_eval_callback
def never_stop(tensor, ask, user_data):
    return False if ask else True


class WithCallback(StockPlaced):
    """Stock placement with an eval callback that never asks for a node."""

    @property
    def context_params(self):
        return self.__dict__["context_params"]

    @context_params.setter
    def context_params(self, params):
        params.cb_eval = never_stop
        params.cb_eval_user_data = None
        self.__dict__["context_params"] = params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--why", action="store_true",
                        help="decode a few tokens all on the GPU with and without the callback, with llama.cpp's "
                             "debug log on (its CUDA graph messages go to stderr)")
    args = parser.parse_args()
    if args.why:
        for cls, label in ((StockPlaced, "no callback"), (WithCallback, "idle callback")):
            print(f"=== {label}", file=sys.stderr, flush=True)
            llm = cls(args.model, cpu_pattern=None, n_ctx=1024, n_threads=16, n_gpu_layers=-1, verbose=True)
            print(f"=== {label}: decoding", file=sys.stderr, flush=True)
            decode_rate(llm, 8)
            print(f"=== {label}: done", file=sys.stderr, flush=True)
            llm.close()
        return 0
    kw = dict(n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=16, n_threads_batch=16, n_gpu_layers=-1, verbose=False)
    modes = {
        "stock GPU": StockPlaced(args.model, cpu_pattern=None, **kw),
        "stock GPU + idle callback": WithCallback(args.model, cpu_pattern=None, **kw),
        "stock RAM": StockPlaced(args.model, cpu_pattern=EXPERT_TENSOR_PATTERN, **kw),
        "stock RAM + idle callback": WithCallback(args.model, cpu_pattern=EXPERT_TENSOR_PATTERN, **kw),
    }
    rates: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for rep in range(args.reps):
        for name in names[rep % 4:] + names[: rep % 4]:
            rates[name].append(decode_rate(modes[name], args.tokens))
    result = {"cuda_graphs_disabled_by_env": bool(os.environ.get("GGML_CUDA_DISABLE_GRAPHS")),
              "decode_tok_s": {name: statistics.median(r) for name, r in rates.items()}}
    print(json.dumps(result, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for llm in modes.values():
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
