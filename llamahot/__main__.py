"""`llamahot demo` (or `python -m llamahot demo`): generate text with the embedded default model and show what llamahot saw."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_PRESET = "qwen3moe-tiny"


def default_model_path() -> Path:
    """The embedded default model, synthesized once into the user's cache directory."""
    from llamahot.synth import synth_model

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamahot" / "models"
    path = cache / f"{DEFAULT_PRESET}.gguf"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        synth_model(tmp, DEFAULT_PRESET, seed=0)
        tmp.replace(path)  # never leave a half-written model behind
    return path


def demo(args: argparse.Namespace) -> int:
    import numpy as np

    from llamahot import Llama

    model = Path(args.model) if args.model else default_model_path()
    llm = Llama(str(model), hot_experts=args.hot_experts, n_ctx=1024, verbose=False)
    print(f"model: {model}  ({llm.hot_cache.layout.arch}, {llm.hot_cache.layout.n_moe_layers} MoE layers, "
          f"{llm.hot_cache.layout.n_expert} experts, {llm.hot_cache.layout.n_expert_used} used per token)")
    print(f"prompt: {args.prompt!r}\n---")
    for chunk in llm.create_completion(args.prompt, max_tokens=args.max_tokens, temperature=0.0, stream=True):
        sys.stdout.write(chunk["choices"][0]["text"])
        sys.stdout.flush()
    stats = llm.hot_cache.stats()
    counts = llm.hot_cache.routing_counts()
    share = np.sort(counts, axis=1)[:, ::-1][:, : max(args.hot_experts, 1)].sum(axis=1) / np.maximum(counts.sum(axis=1), 1)
    print("\n---")
    print(f"tokens {stats['tokens']} in {stats['ubatches']} ubatches; decode {stats['decode_tok_s']:.1f} tok/s, "
          f"prefill {stats['prefill_tok_s']:.1f} tok/s")
    print(f"routing: the {max(args.hot_experts, 1)} most-used experts of each layer took "
          f"{100 * share.mean():.0f}% of its selections (mean over layers)")
    print(f"hot experts ({stats['slot_device']} slots, {stats['policy']} policy): hit rate {stats['hit_rate']:.1%} "
          f"({stats['hits']} hits, {stats['misses']} misses), {stats['slots_occupied']}/{stats['slots_total']} "
          f"slots filled, {stats['rebalances']} rebalances, {stats['bytes_moved'] / 2**20:.1f} MiB moved")
    llm.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamahot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate text with the embedded default model and print llamahot's statistics")
    p.add_argument("--model", help="a MoE GGUF file (default: the embedded synthetic model)")
    p.add_argument("--hot-experts", type=int, default=8, help="hot experts per MoE layer (default 8)")
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
