"""The `llamahot` command (also `python -m llamahot`).

  llamahot demo              generate text with the embedded default model and show what llamahot saw
  llamahot inspect MODEL     a GGUF model's MoE layout, expert sizes and the memory K slots take
  llamahot synth PRESET OUT  write a synthetic test model
  llamahot serve MODEL       an OpenAI-compatible server (llama_cpp.server) with hot experts
  llamahot bench MODEL       decode speed of stock placement vs llamahot at a few K, side by side
  llamahot profile MODEL TEXT... OUT   record a routing profile (which experts a text routes to)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "llamahot-code-moe.gguf"


def default_model_path() -> Path:
    """The embedded default model: a small MoE the project trained on Python code (models/README.md),
    installed with the package."""
    from importlib.resources import files

    path = Path(str(files("llamahot.models") / DEFAULT_MODEL))
    if not path.is_file():
        raise SystemExit(f"the embedded model {DEFAULT_MODEL} is missing from {path.parent}; "
                         "reinstall llamahot (pip install --force-reinstall llamahot) or pass --model")
    return path


def demo(args: argparse.Namespace) -> int:
    import numpy as np

    from llamahot import Llama

    from llamahot.progress import loading

    model = Path(args.model) if args.model else default_model_path()
    with loading(model.name) as progress:
        llm = Llama(str(model), hot_experts=args.hot_experts, n_ctx=1024, verbose=False, load_progress=progress)
    print(f"model: {model}  ({llm.hot_cache.layout.arch}, {llm.hot_cache.layout.n_moe_layers} MoE layers, "
          f"{llm.hot_cache.layout.n_expert} experts, {llm.hot_cache.layout.n_expert_used} used per token)")
    print(f"prompt: {args.prompt!r}\n---")
    # Sampled with a fixed seed: the same text every run (and the same with or without hot experts).
    for chunk in llm.create_completion(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                       top_p=0.95, repeat_penalty=1.1, seed=args.seed, stream=True):
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


def inspect(args: argparse.Namespace) -> int:
    from llamahot.model_info import read_moe_layout
    from llamahot.slots import VRAM_RESERVE, largest_k_that_fits

    layout = read_moe_layout(args.model)  # ValueError with the reason for files that are not MoE GGUFs
    per_expert = layout.expert_matrix_bytes
    print(f"{Path(layout.path).name}: {layout.arch}, {layout.n_blocks} blocks, {layout.n_moe_layers} MoE layers "
          f"x {layout.n_expert} routed experts, {layout.n_expert_used} used per token")
    print(f"  projections per expert: {', '.join(layout.projections)}; one expert of one layer: "
          f"{per_expert / 2**20:.2f} MiB of weights ({layout.expert_bytes / 2**20:.2f} MiB with biases/scales)")
    print(f"  all routed experts: {layout.expert_tensor_bytes / 2**30:.2f} GiB; a decode token reads about "
          f"{layout.n_moe_layers * layout.n_expert_used * per_expert / 2**20:.0f} MiB of them")
    print("  slots per layer (hot_experts) -> memory for slots:")
    ks = sorted({k for k in (1, 4, 8, 16, 32, 44, 64, 96, 128, 256) if k <= layout.n_expert} | {layout.n_expert})
    for k in ks:
        print(f"    K={k:<4d} {k * per_expert * layout.n_moe_layers / 2**30:8.2f} GiB "
              f"({100 * k / layout.n_expert:.0f} % of the experts)")
    layer_gib = layout.expert_tensor_bytes / layout.n_moe_layers / 2**30
    print(f"  one resident layer (resident_layers, all its experts on the GPU): {layer_gib:.2f} GiB, "
          f"the memory of {layout.n_expert} slots in one layer")
    if args.vram_gib is not None:
        free = int(args.vram_gib * 2**30)
        fits = largest_k_that_fits(free, per_expert, layout.n_moe_layers, layout.n_expert)
        print(f"  with {args.vram_gib:g} GiB free after loading (keeping {VRAM_RESERVE / 2**30:.1f} GiB headroom): "
              f"hot_experts={fits}")
    return 0


def synth(args: argparse.Namespace) -> int:
    from llamahot.progress import synth_with_progress

    path = synth_with_progress(args.out, args.preset, seed=args.seed)
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
    return 0


def serve(args: argparse.Namespace) -> int:
    from llamahot.model_info import read_moe_layout

    read_moe_layout(args.model)  # fail fast, with the reason, before the server starts
    try:
        from llamahot.server import serve as run_server
    except ImportError as exc:
        raise ValueError(str(exc)) from exc
    print(f"llamahot serve: {args.model} with hot_experts={args.hot_experts} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    run_server(args.model, host=args.host, port=args.port, hot_experts=args.hot_experts, n_ctx=args.n_ctx,
               n_gpu_layers=-1, slot_device=args.slot_device, rebalance_interval=args.rebalance_interval,
               resident_layers=args.resident_layers, gpu_mode=args.gpu_mode,
               routing_profile=args.routing_profile, verbose=False)
    return 0


def bench(args: argparse.Namespace) -> int:
    from llamahot.benchmark import compare, format_rows

    ks = [int(k) for k in args.hot_experts.split(",")]
    print(format_rows(compare(args.model, ks, tokens=args.tokens, reps=args.reps, n_ctx=args.n_ctx)))
    return 0


def profile(args: argparse.Namespace) -> int:
    import numpy as np

    from llamahot.model_info import read_moe_layout
    from llamahot.profile import load_profile, record_profile

    layout = read_moe_layout(args.model)
    missing = [t for t in args.text if not Path(t).is_file()]
    if missing:
        raise FileNotFoundError(f"no such text file: {', '.join(missing)}")
    texts = [Path(t).read_bytes() for t in args.text]
    n = record_profile(args.model, texts, args.out, window=args.window, max_tokens=args.max_tokens,
                       slot_device=args.slot_device)
    prof = load_profile(args.out, layout)
    rates = np.sort(prof.rates(layout), axis=1)[:, ::-1]
    k = max(1, round(0.4 * layout.n_expert))
    share = rates[:, :k].sum(axis=1) / np.maximum(rates.sum(axis=1), 1e-12)
    print(f"{args.out}: {n} tokens recorded, {prof.tokens.max():.0f} in all; the {k} most-routed experts of each "
          f"layer take {100 * share.mean():.1f}% of its routing (mean over layers). Use it with "
          f"Llama(..., routing_profile={str(args.out)!r}).")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamahot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate text with the embedded default model and print llamahot's statistics")
    p.add_argument("--model", help="a MoE GGUF file (default: the embedded model trained on Python code)")
    p.add_argument("--hot-experts", type=int, default=8, help="hot experts per MoE layer (default 8)")
    p.add_argument("--prompt", default="def read_config(path):\n")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.set_defaults(func=demo)
    p = sub.add_parser("inspect", help="show a model's MoE layout, expert sizes and the memory K slots take")
    p.add_argument("model", help="a GGUF file")
    p.add_argument("--vram-gib", type=float, default=None,
                   help="free VRAM after loading the model: print the largest hot_experts that fits")
    p.set_defaults(func=inspect)
    from llamahot.synth import PRESETS

    p = sub.add_parser("synth", help="write a synthetic test model (deterministic, nothing downloaded)")
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("out", type=Path, help="output .gguf path")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=synth)
    p = sub.add_parser("serve", help="an OpenAI-compatible server (llama_cpp.server) with hot experts",
                       description="More options: python -m llamahot.server --help (all of llama_cpp.server's).")
    p.add_argument("model", help="a MoE GGUF file")
    p.add_argument("--hot-experts", type=int, default=8)
    p.add_argument("--rebalance-interval", type=int, default=None,
                   help="tokens between rebalances (default: 4, or 64 with --gpu-mode managed)")
    p.add_argument("--resident-layers", type=int, default=0,
                   help="keep every expert of the last N MoE layers on the GPU; slots for the rest (default 0)")
    p.add_argument("--slot-device", default="auto", choices=["auto", "cuda", "host"])
    p.add_argument("--gpu-mode", default=None, choices=["managed", "redirect"],
                   help="with CUDA: experts in place in CUDA managed memory (managed) or VRAM slots with cold experts "
                        "on the CPU (redirect); default: managed where the GPU supports it, else redirect")
    p.add_argument("--routing-profile", default=None,
                   help="a routing profile file (see `llamahot profile`): the hot set at start, updated at exit")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=serve)
    p = sub.add_parser("bench", help="decode speed of stock placement vs llamahot at a few K, side by side")
    p.add_argument("model", help="a MoE GGUF file")
    p.add_argument("--hot-experts", default="8,16", help="comma-separated K values (default 8,16)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.set_defaults(func=bench)
    p = sub.add_parser("profile", help="record a routing profile from text (the hot set to start from)",
                       description="Adds the routing of the texts to OUT (made if missing), by prompt processing.")
    p.add_argument("model", help="a MoE GGUF file")
    p.add_argument("text", nargs="+", help="text files like what the model will be used for")
    p.add_argument("out", help="the profile file (.npz) to make or add to")
    p.add_argument("--window", type=int, default=512, help="tokens per prompt (default 512)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--slot-device", default="auto", choices=["auto", "cuda", "host"])
    p.set_defaults(func=profile)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: say what is wrong, no traceback
        print(f"llamahot {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
