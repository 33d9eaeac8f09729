"""Check an exported GGUF in stock llama.cpp, in a process without torch.

    python training/check_gguf.py MODEL.gguf [--reference REF.npz] [--heldout benchmarks/data/heldout_code.txt]

Prints one JSON line: the held-out bits per byte by llama.cpp (comparable across tokenizers) and,
with the reference train_moe.py writes (the trained tokenizer's ids of the first `n_chars` of the
held-out text, torch's logits for their first tokens), whether llama.cpp tokenizes that text to
the same ids and how close its logits are. A process of its own: on the GPU machine, torch and the
CUDA build of llama_cpp in one process abort at import (`free(): invalid pointer`) or crash in the
model load, whichever comes first (docs/NOTES.md).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import llama_cpp
import numpy as np


def bits_per_byte(path: Path, text: str, n_tokens: int = 1024) -> float:
    """Cross-entropy of the first `n_tokens` tokens of `text`, each predicted from the ones before it,
    in bits per byte of their text."""
    llm = llama_cpp.Llama(str(path), n_ctx=n_tokens + 16, n_batch=n_tokens, logits_all=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:n_tokens]
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nats = -logp[np.arange(len(ids) - 1), ids[1:]].sum()
    n_bytes = len(llm.detokenize(ids[1:]))
    llm.close()
    return float(nats / math.log(2) / n_bytes)


def compare(path: Path, text: str, reference: dict) -> dict:
    """llama.cpp against the trained tokenizer and torch: same ids, logits close."""
    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, seed=0)
    text = text[: int(reference["n_chars"])]
    ids_ref = reference["ids"].tolist()
    same_ids = llm.tokenize(text.encode(), add_bos=False, special=False) == ids_ref
    prompt = ids_ref[: len(reference["logits"])]
    llm.eval(prompt)
    logits = np.asarray(llm.scores[: len(prompt)], dtype=np.float32)
    ref = reference["logits"]
    llm.close()
    return {"tokenizer_ids_identical": same_ids, "tokens_compared": len(ids_ref),
            "max_abs_logit_diff": float(np.abs(logits - ref).max()),
            "argmax_agreement": float((logits.argmax(-1) == ref.argmax(-1)).mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--reference", type=Path, help=".npz written by train_moe.py (ids, n_chars, logits)")
    parser.add_argument("--heldout", type=Path, default=Path("benchmarks/data/heldout_code.txt"))
    args = parser.parse_args(argv)
    if not args.model.is_file():
        sys.exit(f"no model at {args.model}")
    text = args.heldout.read_text()
    result = {}
    if args.reference:
        result.update(compare(args.model, text, dict(np.load(args.reference))))
    result["heldout_bits_per_byte"] = round(bits_per_byte(args.model, text), 4)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
