"""Issue #4's "callback installed but idle ≤ 3 % of stock", measured against the order instances are made in.

Two instances of one model in one process: stock llama-cpp-python with the experts in host memory, and
llamahot.Llama with K = 0 whose callback is installed and either idle (never stops) or observing
(a stop per MoE layer to count routing). Every repetition decodes a teacher-forced window of held-out
code on each row (rotated order) and prefills 512 tokens. In session 15 the instance made first in a
process ran 5-7 % faster or slower than the one made second, depending on the machine (the same
variant won in one process and lost in the other), more than the 3 % target; so run it twice,
`--first stock` and `--first llamahot`, and take the geometric mean of the two ratios.

    python benchmarks/gpu/idle_probe.py MODEL.gguf --first stock|llamahot [--reps 8] [--tokens 64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import llamahot  # before numpy: numpy first made the device's CUDA build of llama_cpp die silently at load
from llamahot.benchmark import StockPlaced, decode_rate
from llamahot.model_info import EXPERT_TENSOR_PATTERN

sys.path.insert(0, str(Path(__file__).parent))
from bench import prefill_rate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--first", choices=("stock", "llamahot"), required=True)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--slot-device", default="cuda", help="host: a dry run on a machine without a GPU")
    args = parser.parse_args()
    kw = dict(n_gpu_layers=-1, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    make = {"stock": lambda: StockPlaced(args.model, cpu_pattern=EXPERT_TENSOR_PATTERN, **kw),
            "llamahot": lambda: llamahot.Llama(args.model, hot_experts=0, slot_device=args.slot_device,
                                               gpu_mode="redirect", **kw)}
    order = [args.first, "llamahot" if args.first == "stock" else "stock"]
    made = {name: make[name]() for name in order}
    ram, hot = made["stock"], made["llamahot"]
    text = ram.tokenize(Path("benchmarks/data/heldout_code.txt").read_text().encode(), add_bos=False)
    span = 16 + args.tokens
    windows = [text[i: i + span] for i in range(0, len(text) - span, span)]
    long_prompt = text[: args.prefill]
    rows = {"stock RAM": (ram, None), "llamahot idle": (hot, False), "llamahot observing": (hot, True)}
    decode = {name: [] for name in rows}
    prefill = {name: [] for name in rows}
    for name, (llm, observing) in rows.items():   # warm-up, not measured
        if observing is not None:
            hot.hot_cache.set_observing(observing)
        decode_rate(llm, 8, text_tokens=windows[-1])
    for rep in range(args.reps):
        names = list(rows)[rep % len(rows):] + list(rows)[: rep % len(rows)]
        for name in names:
            llm, observing = rows[name]
            if observing is not None:
                hot.hot_cache.set_observing(observing)
            decode[name].append(decode_rate(llm, args.tokens, text_tokens=windows[rep % (len(windows) - 1)]))
            prefill[name].append(prefill_rate(llm, long_prompt))
    print(f"instances made in the order {' then '.join(order)}; {args.reps} repetitions of {args.tokens} "
          f"teacher-forced tokens and a {args.prefill}-token prefill")
    for name in rows:
        print(f"  {name}: decode {statistics.median(decode[name]):.2f} tok/s, prefill {statistics.median(prefill[name]):.0f} tok/s")
    for name in ("llamahot idle", "llamahot observing"):
        # Per repetition (the machine drifts between repetitions), then the median.
        d = statistics.median(a / b for a, b in zip(decode[name], decode["stock RAM"]))
        p = statistics.median(a / b for a, b in zip(prefill[name], prefill["stock RAM"]))
        print(f"  {name} vs stock RAM: decode {d:.3f}, prefill {p:.3f} (first made: {order[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
