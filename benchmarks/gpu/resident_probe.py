"""Where the time goes with resident layers: stock all-on-GPU against llamahot with all but one
MoE layer resident, and with none, on one model (per-token breakdown from llamahot's timeline).

    python benchmarks/gpu/resident_probe.py MODEL.gguf [--threads N] [--why]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import StockPlaced, breakdown_of  # noqa: E402

import llamahot  # noqa: E402
from llamahot.benchmark import decode_rate  # noqa: E402
from llamahot.model_info import read_moe_layout  # noqa: E402


def why(path: str, n_moe_layers: int, n_expert: int) -> None:
    """llama.cpp's debug log (its CUDA-graph messages) while decoding with all but one layer resident."""
    hot = llamahot.Llama(path, hot_experts=n_expert, resident_layers=n_moe_layers - 1, slot_device="cuda",
                         gpu_mode="redirect",
                         n_ctx=1024, n_threads=16, n_gpu_layers=-1, verbose=True)
    print("=== decoding", file=sys.stderr, flush=True)
    decode_rate(hot, 12)
    print("=== done", file=sys.stderr, flush=True)
    hot.close()


def main() -> int:
    path = sys.argv[1]
    layout = read_moe_layout(path)
    if "--why" in sys.argv:
        why(path, layout.n_moe_layers, layout.n_expert)
        return 0
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 16
    kw = dict(n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_gpu_layers=-1, verbose=False)
    gpu = StockPlaced(path, cpu_pattern=None, **kw)
    print("stock GPU tok/s", round(decode_rate(gpu, 32), 1), flush=True)
    gpu.close()
    # Stock with the same placement as llamahot's "all but one resident": is a host split alone the cost?
    one_on_cpu = StockPlaced(path, cpu_pattern=layout.without_last(layout.n_moe_layers - 1).expert_pattern(), **kw)
    print("stock static, first MoE layer's experts on CPU, tok/s", round(decode_rate(one_on_cpu, 32), 1), flush=True)
    one_on_cpu.close()
    for resident in (layout.n_moe_layers - 1, 0):
        hot = llamahot.Llama(path, hot_experts=layout.n_expert, resident_layers=resident, slot_device="cuda",
                             gpu_mode="redirect", **kw)
        decode_rate(hot, 16)
        rate = decode_rate(hot, 32)
        print(f"resident {resident}: tok/s {rate:.1f}; breakdown (ms/token):",
              json.dumps({k: round(v, 3) for k, v in breakdown_of(hot, skip_compute=False).items()}), flush=True)
        hot.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
