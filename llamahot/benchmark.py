"""Stock vs llamahot on one model, side by side (used by `llamahot bench` and examples/bench.py)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import llama_cpp
import numpy as np

from llamahot.hot_cache import HostPlacement
from llamahot.llama import Llama

PROMPT = b"def fibonacci(n):\n    if n < 2:\n        return n\n"


@dataclass
class Row:
    mode: str
    decode_tok_s: float
    vs_stock: float
    hit_rate: Optional[float]


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """A copy of the logits of the last evaluated token (works without logits_all)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


class StockPlaced(llama_cpp.Llama):
    """Stock llama_cpp.Llama with the tensors matching `cpu_pattern` in host memory (like `-ot PATTERN=CPU`)."""

    def __init__(self, path: str, *, cpu_pattern: str | None, **kwargs):
        self._placement = HostPlacement(cpu_pattern) if cpu_pattern else None
        # The same host memory as llamahot's experts (pinned CUDA_Host, not a pageable mmap) unless asked.
        kwargs.setdefault("use_mmap", False)
        super().__init__(path, **kwargs)

    @property
    def model_params(self):
        return self.__dict__["model_params"]

    @model_params.setter
    def model_params(self, params):
        if self._placement is not None:
            params.tensor_buft_overrides = self._placement.address
        params.use_extra_bufts = False   # as llamahot.Llama: the same weight layout on both sides
        self.__dict__["model_params"] = params


def greedy_run(llm, steps: int, forced: list[int] | None = None, prompt: bytes = PROMPT) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits of every step; with `forced`, feed those tokens instead (teacher forcing)."""
    llm.reset()
    llm.eval(llm.tokenize(prompt))
    tokens, logits = [], []
    for i in range(steps):
        row = last_logits(llm)
        logits.append(row)
        tokens.append(int(np.argmax(row)))
        llm.eval([forced[i] if forced is not None else tokens[-1]])
    return tokens, np.stack(logits)


def decode_rate(llm: llama_cpp.Llama, n_tokens: int,
                after_prompt: Optional[Callable[[llama_cpp.Llama], None]] = None,
                text_tokens: Optional[list[int]] = None, prompt_tokens: int = 16) -> float:
    """tok/s of single-token decode steps after a short prompt; `after_prompt(llm)` runs between
    the two (e.g. to zero llamahot's counters so they cover the decode steps alone).

    Greedy by default; with `text_tokens` the run is teacher-forced: the first `prompt_tokens` of
    them are the prompt and the next `n_tokens` are fed one at a time (real text, real routing)."""
    return n_tokens / sum(decode_step_times(llm, n_tokens, after_prompt, text_tokens, prompt_tokens))


def decode_step_times(llm: llama_cpp.Llama, n_tokens: int,
                      after_prompt: Optional[Callable[[llama_cpp.Llama], None]] = None,
                      text_tokens: Optional[list[int]] = None, prompt_tokens: int = 16,
                      eval_step: Optional[Callable[[list[int]], None]] = None) -> list[float]:
    """Seconds of each decode step of decode_rate's run (the same arguments); eval_step: how a step is
    evaluated (default llm.eval)."""
    eval_step = eval_step or llm.eval
    llm.reset()
    if text_tokens is not None:
        assert len(text_tokens) >= prompt_tokens + n_tokens, "text too short for the run"
        llm.eval(text_tokens[:prompt_tokens])
    else:
        llm.eval(llm.tokenize(PROMPT))
    if after_prompt is not None:
        after_prompt(llm)
    times = []
    for i in range(n_tokens):
        token = int(np.argmax(last_logits(llm))) if text_tokens is None else text_tokens[prompt_tokens + i]
        start = time.perf_counter()
        eval_step([token])
        finish(llm)
        times.append(time.perf_counter() - start)
    return times


def eval_without_after_work(llm: llama_cpp.Llama) -> Callable[[list[int]], None]:
    """An eval_step for decode_step_times on a llamahot.Llama: the shim still decides which steps are read
    (before_eval), then llama_cpp.Llama.eval, without llamahot's after-eval work (timing, policy,
    rebalance)."""
    def step(tokens: list[int]) -> None:
        llm.hot_cache.before_eval(len(tokens))
        llama_cpp.Llama.eval(llm, tokens)
    return step


def finish(llm: llama_cpp.Llama) -> None:
    """Wait for the decode's device work. Stock llama_decode returns once a GPU graph is *queued*
    (its logits are waited for when read), so a timer around eval alone sees only the submission."""
    llama_cpp.llama_synchronize(llm.ctx)


def record_trace(model: str, text: str, n_tokens: int) -> np.ndarray:
    """Routing of each token when the model reads `text` one token at a time (teacher forcing)."""
    llm = Llama(model, hot_experts=0, slot_device="host", n_ctx=n_tokens + 8, verbose=False)
    tokens = llm.tokenize(text.encode(), add_bos=False)[:n_tokens]
    rows, before = [], llm.hot_cache.routing_counts()
    for token in tokens:
        llm.eval([token])
        after = llm.hot_cache.routing_counts()
        rows.append(after - before)
        before = after
    llm.close()
    return np.stack(rows)


def compare(model: str, ks: Iterable[int], *, tokens: int = 128, reps: int = 3, **llama_kwargs) -> list[Row]:
    """Decode speed of stock placement (experts in RAM, callback idle) and of llamahot at each K.

    All models stay loaded and take turns for `reps` repetitions; medians are reported."""
    llama_kwargs.setdefault("verbose", False)
    stock = Llama(model, hot_experts=0, **llama_kwargs)
    stock.hot_cache.set_observing(False)  # experts in RAM like `-ot exps=CPU`, nothing redirected
    runs = {"stock (experts in RAM)": stock}
    for k in ks:
        runs[f"llamahot K={k}"] = Llama(model, hot_experts=k, **llama_kwargs)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for _ in range(reps):
            for name, llm in runs.items():
                rates[name].append(decode_rate(llm, tokens))
        base = statistics.median(rates["stock (experts in RAM)"])
        return [Row(name, statistics.median(rates[name]), statistics.median(rates[name]) / base,
                    llm.hot_cache.stats()["hit_rate"] if llm.hot_cache.hot_experts else None)
                for name, llm in runs.items()]
    finally:
        for llm in runs.values():
            llm.close()


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'mode':28s} {'decode tok/s':>12s} {'vs stock':>9s} {'hit rate':>9s}"]
    for row in rows:
        hit = f"{row.hit_rate:.1%}" if row.hit_rate is not None else "-"
        lines.append(f"{row.mode:28s} {row.decode_tok_s:12.1f} {row.vs_stock:9.3f} {hit:>9s}")
    return "\n".join(lines)
