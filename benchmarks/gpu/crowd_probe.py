"""Probe: do later model loads in the same process push an in-place instance's hot experts out of VRAM?

    python benchmarks/gpu/crowd_probe.py MODEL.gguf --out DIR --text TEXT [--k 51] [--crowd 5]

The bench (bench.py) loads every row's instance in one process: stock all-on-GPU, static, redirect, and one
managed instance per in-place row, each of which first loads the whole model into VRAM (managed memory)
before its cold experts leave. If VRAM runs out meanwhile, the driver evicts managed pages of instances
loaded earlier, hot experts included; their pages stay mapped (accessed-by GPU), so the GPU then reads them
over PCIe while llamahot counts them as hits.

Steps: one in-place instance at K with a routing profile of the text's second half decodes windows alone
(A); then stock all-on-GPU and --crowd more in-place instances load; the first decodes the same windows (B);
its hot set's pages are prefetched to VRAM again (timed) and it decodes them once more (C).
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp  # (before cuda.bindings: docs/NOTES.md, import order on the device)
import numpy as np

import llamahot
from llamahot.benchmark import decode_rate
from llamahot.hot_cache import free_vram_bytes

sys.path.insert(0, str(Path(__file__).parent))
from probe_common import llama_kw, probe_arguments, record_second_half, text_windows  # noqa: E402


def main() -> int:
    ap = probe_arguments(__doc__, tokens=256)
    ap.add_argument("--crowd", type=int, default=5)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = llama_kw(args.threads)
    windows = text_windows(args.model, args.text, args.tokens)
    tmp = Path(tempfile.mkdtemp())
    profile = tmp / "profile.npz"
    record_second_half(args.model, windows, 40, profile, args.threads)
    main_llm = llamahot.Llama(args.model, hot_experts=args.k, slot_device="cuda", gpu_mode="managed",
                              routing_profile=profile, **kw)
    result: dict = {"free_vram_gib": {"after the first instance": free_vram_bytes() / 2**30}}

    def decode(label: str) -> list[float]:
        rates = [decode_rate(main_llm, args.tokens, text_tokens=w) for w in windows[: args.windows]]
        print(f"  {label}: {' / '.join(f'{r:.1f}' for r in rates)} tok/s (median {statistics.median(rates):.1f}), "
              f"free VRAM {free_vram_bytes() / 2**30:.2f} GiB", flush=True)
        result[label] = rates
        return rates

    decode_rate(main_llm, 64, text_tokens=windows[-1])   # CUDA graphs captured before anything is timed
    decode("A alone")
    crowd = [llama_cpp.Llama(args.model, **kw)]   # stock all-on-GPU (cudaMalloc)
    result["free_vram_gib"]["after stock all-on-GPU"] = free_vram_bytes() / 2**30
    for i in range(args.crowd):
        start = time.perf_counter()
        try:
            crowd.append(llamahot.Llama(args.model, hot_experts=args.k, slot_device="cuda", gpu_mode="managed",
                                        **kw))
        except ValueError as e:   # the in-place VRAM check refuses once free VRAM reads too little
            print(f"  in-place instance {i + 2} refused: {e}", flush=True)
            break
        result["free_vram_gib"][f"after in-place instance {i + 2}"] = free_vram_bytes() / 2**30
        print(f"  loaded in-place instance {i + 2} in {time.perf_counter() - start:.1f} s, free VRAM "
              f"{free_vram_bytes() / 2**30:.2f} GiB", flush=True)
    decode("B after the other loads")
    slots = main_llm.hot_cache.slots
    layers, slot = np.nonzero(slots.expert_of_slot >= 0)
    start = time.perf_counter()
    slots.pages.move(slots._ranges(layers, slots.expert_of_slot[layers, slot]), to_gpu=True)
    slots.pages.wait()
    result["prefetch_hot_set_again_s"] = time.perf_counter() - start
    print(f"  hot set prefetched to VRAM again in {result['prefetch_hot_set_again_s'] * 1e3:.0f} ms "
          f"({len(layers)} experts)", flush=True)
    decode("C after prefetching the hot set again")
    (out / "crowd_probe.json").write_text(json.dumps(result, indent=1))
    for llm in crowd:
        llm.close()
    main_llm.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
