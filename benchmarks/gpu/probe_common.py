"""What the probes run by probe.sh share: their common arguments, llama's settings, the text's windows, a
routing profile from the text's second half."""
from __future__ import annotations

import argparse
from pathlib import Path

import llama_cpp

from llamahot.profile import record_profile


def probe_arguments(doc: str, tokens: int) -> argparse.ArgumentParser:
    """MODEL --out DIR --text TEXT [--k] [--tokens] [--windows] [--threads]; add a probe's own after."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--k", type=int, default=51)
    ap.add_argument("--tokens", type=int, default=tokens, help="decode steps a window")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--threads", type=int, default=16)
    return ap


def llama_kw(threads: int) -> dict:
    """Every instance's settings (those of bench.py's rows)."""
    return dict(n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=-1, verbose=False)


def text_windows(model: str, text: str, tokens: int) -> list[list[int]]:
    """The text's tokens in windows of a 16-token prompt plus `tokens` steps (as bench.py cuts them)."""
    vocab = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    ids = vocab.tokenize(Path(text).read_bytes(), add_bos=False)
    vocab.close()
    size = 16 + tokens
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]


def record_second_half(model: str, windows: list[list[int]], n_windows: int, path, threads: int,
                       slot_device: str = "cuda") -> int:
    """A routing profile at `path` from the first `n_windows` windows of the text's second half (the probes
    decode windows from its start, so the profile never saw them); returns the windows recorded."""
    recorded = windows[len(windows) // 2:][:n_windows]
    record_profile(model, recorded, path, slot_device=slot_device, n_gpu_layers=-1, n_threads=threads,
                   n_threads_batch=threads)
    return len(recorded)
