"""Interactive streaming chat with any MoE GGUF through llamahot, with a one-line live stats footer.

    python examples/chat.py MODEL.gguf [--hot-experts 44] [--n-ctx 4096] [--system "..."]
    python examples/chat.py            (the embedded default model)

Type a message and Enter; an empty line or Ctrl-D quits. Watch it live from another terminal with
`llamahot-tui`.
"""
from __future__ import annotations

import argparse
import sys

from llamahot import Llama


def footer(llm: Llama) -> str:
    s = llm.hot_cache.stats()
    return (f"[hit rate {s['hit_rate']:.1%} | {s['slots_occupied']}/{s['slots_total']} slots | "
            f"decode {s['decode_tok_s']:.1f} tok/s | prefill {s['prefill_tok_s']:.0f} tok/s | "
            f"{s['rebalances']} rebalances, {s['bytes_moved'] / 2**20:.0f} MiB moved]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="a MoE GGUF (default: the embedded synthetic model)")
    parser.add_argument("--hot-experts", type=int, default=8, help="hot-expert slots per MoE layer")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--system", default="You are a helpful assistant.")
    args = parser.parse_args(argv)
    if args.model is None:
        from llamahot.__main__ import default_model_path
        args.model = str(default_model_path())

    llm = Llama(args.model, hot_experts=args.hot_experts, n_ctx=args.n_ctx, verbose=False)
    messages = [{"role": "system", "content": args.system}]
    print(f"chatting with {args.model} (hot_experts={args.hot_experts}); empty line to quit")
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        print("assistant> ", end="", flush=True)
        reply = []
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=args.max_tokens,
                                                temperature=args.temperature, stream=True):
            piece = chunk["choices"][0]["delta"].get("content") or ""
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        print(f"\n{footer(llm)}")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
