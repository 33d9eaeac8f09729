"""Deterministic, streaming generator of synthetic Mixture-of-Experts GGUF models.

Tests and benchmarks need MoE models that stock llama.cpp loads and runs, in
several architectures and expert layouts, without downloading anything.  This
module writes such models from a :class:`ModelSpec`:

* every tensor's bytes come from a numpy RNG seeded by (seed, tensor name,
  chunk index), so files are byte-identical across runs and independent of
  generation order;
* quantized tensors (Q4_K, Q8_0, MXFP4) are built directly as block arrays
  whose dequantized values are zero-mean with std ~ 1/sqrt(fan_in), so
  activations stay small and logits are finite and input dependent;
* the file is streamed: tensor infos are declared up front, then each tensor
  is generated and written chunk by chunk, so memory stays bounded even for
  multi-GiB specs such as the ``qwen3moe-30b-a3b`` preset;
* all presets share one SentencePiece-style ("llama") BPE tokenizer learned
  from a small corpus embedded below, plus a ChatML chat template;
* random weights route almost uniformly over experts; a qwen3moe spec with a
  :class:`RoutingSpec` (presets ``qwen3moe-30b-a3b-routed``,
  ``qwen3moe-routed-mini``) instead routes like a trained model: Zipf-like
  expert popularity, token dependence and temporal locality, calibrated
  against Qwen3-30B-A3B's published statistics (docs/ROUTING.md).

CLI: ``python -m llamahot.synth PRESET OUT.gguf [--seed N]``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QType

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

_CORPUS = r'''
Hello, world! This is a small corpus used to learn a tiny tokenizer. It mixes
plain English prose with Python code, so that both kinds of prompts split into
sensible pieces. The quick brown fox jumps over the lazy dog. A model reads
text as a sequence of tokens, and each token maps to a row of the embedding
table. Mixture-of-experts models route every token to a few experts out of
many, which keeps the number of active parameters small while the total number
of parameters stays large. The router computes a score for each expert, picks
the top experts, and mixes their outputs with the normalized scores.

Once upon a time, there was a little robot who wanted to learn how to write
programs. Every morning the robot opened its notebook and wrote a new function.
Some functions were short and simple; others were long and full of loops. The
robot learned that good code is easy to read, easy to test, and easy to change.
When a test failed, the robot read the error message carefully, found the bug,
and fixed it. Over time the robot became a better programmer, and it started to
help other robots with their code. They worked together, shared their ideas,
and built many useful tools for the people in the town.

The weather today is sunny with a light breeze from the west. In the afternoon
there may be a few clouds, and the temperature will reach about twenty degrees.
Tomorrow will be colder, so remember to bring a warm jacket and an umbrella.
The city library opens at nine in the morning and closes at six in the evening.
You can borrow up to ten books at a time, and you can return them at any branch.

Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are there in a week? Answer: There are seven days.
Question: What is two plus three? Answer: Two plus three is five.
User: Can you explain what a function is? Assistant: Sure! A function is a
named block of code that takes some input, does some work, and returns a result.
You define it once and call it as many times as you need.

def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


def factorial(n: int) -> int:
    result = 1
    for i in range(2, n + 1):
        result *= i
    return result


def is_prime(number):
    if number < 2:
        return False
    for divisor in range(2, int(number ** 0.5) + 1):
        if number % divisor == 0:
            return False
    return True


class Stack:
    """A simple last-in, first-out stack."""

    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()

    def __len__(self):
        return len(self.items)


def read_lines(path):
    with open(path, "r", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def count_words(text):
    counts = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda item: item[1], reverse=True)


import os
import sys
import json
from pathlib import Path


def main(argv=None):
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: main.py FILE", file=sys.stderr)
        return 1
    data = json.loads(Path(args[0]).read_text())
    for key, value in data.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def binary_search(values, target):
    low, high = 0, len(values) - 1
    while low <= high:
        middle = (low + high) // 2
        if values[middle] == target:
            return middle
        elif values[middle] < target:
            low = middle + 1
        else:
            high = middle - 1
    return -1


numbers = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
squares = [x * x for x in numbers if x % 2 == 1]
total = sum(squares)
print("Hello, world")
print("The total is", total)
print(fibonacci(10), factorial(5), is_prime(17))

try:
    value = int(input("Enter a number: "))
except ValueError as error:
    print("Not a number:", error)
else:
    print("You entered", value)
finally:
    print("Done.")

The function above returns the index of the target value in a sorted list, or
minus one when the value is not present. Binary search is fast because it halves
the search range at every step. Sorting the list first costs more time, but it
pays off when you search the same list many times. In Python, a list comprehension
builds a new list from an existing one, and a dictionary maps keys to values.
Use a for loop to iterate over the items, and use an if statement to filter them.

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Account:
    owner: str
    balance: float = 0.0
    history: list = field(default_factory=list)

    def deposit(self, amount: float) -> None:
        if amount <= 0:
            raise ValueError("amount must be positive")
        self.balance += amount
        self.history.append(("deposit", amount))

    def withdraw(self, amount: float) -> Optional[float]:
        if amount > self.balance:
            return None
        self.balance -= amount
        self.history.append(("withdraw", amount))
        return self.balance


def merge_sort(items):
    if len(items) <= 1:
        return items
    middle = len(items) // 2
    left = merge_sort(items[:middle])
    right = merge_sort(items[middle:])
    merged = []
    while left and right:
        merged.append(left.pop(0) if left[0] <= right[0] else right.pop(0))
    return merged + left + right


async def fetch_all(client, urls):
    results = []
    for url in urls:
        response = await client.get(url, timeout=10)
        response.raise_for_status()
        results.append(response.json())
    return results


def test_fibonacci():
    assert fibonacci(0) == 0
    assert fibonacci(1) == 1
    assert fibonacci(10) == 55
    assert [fibonacci(i) for i in range(6)] == [0, 1, 1, 2, 3, 5]

A good commit message starts with a short summary line, followed by a blank line
and a longer explanation of what changed and why. Small commits are easier to
review than large ones. Before you push your changes, run the tests and make sure
that they all pass. If you find a problem in someone else's code, open an issue
and describe the steps to reproduce it, the result you expected, and the result
you got instead. Kind and clear feedback helps everyone learn faster.

In the garden, the apple trees are in bloom and the bees are busy from sunrise to
sunset. My grandmother grows tomatoes, beans, carrots and potatoes, and every
summer she makes jam from the berries that grow along the fence. On Sundays the
whole family comes for lunch, and the children play football on the grass until
it gets dark. These are simple pleasures, but they make life feel rich and warm.
'''

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))

# ChatML, written with the control tokens above so create_chat_completion works.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llama.cpp token types (llama_token_type in llama.h).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_BYTE = 1, 2, 3, 6
_SPACE = "\u2581"  # SentencePiece's visible space
# llama-cpp-python detokenizes through a 32-byte buffer; keep pieces well below.
_MAX_PIECE_BYTES = 16
# Pre-tokenization for training only (llama.cpp's SPM tokenizer merges freely):
# a word with an optional leading space, one digit, punctuation runs,
# indentation (leaving one space for the next word), newlines.
_PRETOKEN_RE = re.compile(
    rf"{_SPACE}?[A-Za-z_]+|{_SPACE}?\d|{_SPACE}?[^\w\s{_SPACE}]+|{_SPACE}+(?={_SPACE})|{_SPACE}+|\n+"
)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A SentencePiece-BPE vocabulary in llama.cpp's "llama" GGUF layout."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    token_types: tuple[int, ...]


def _learn_merges(words: collections.Counter[str], max_merges: int) -> list[str]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair.

    Merging goes on past frequency 1 (memorizing whole words, as real
    vocabularies do) until ``max_merges`` or until every word is one piece.
    Pieces longer than ``_MAX_PIECE_BYTES`` are never formed.  Returns the
    merged pieces in merge order; ties break on the pair itself, so the result
    is fully deterministic.
    """
    seqs = [list(word) for word in words]
    freqs = list(words.values())
    merges: list[str] = []
    while len(merges) < max_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for seq, freq in zip(seqs, freqs):
            for pair in zip(seq, seq[1:]):
                if len((pair[0] + pair[1]).encode()) <= _MAX_PIECE_BYTES:
                    pairs[pair] += freq
        if not pairs:
            break
        (left, right), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = left + right
        merges.append(merged)
        for seq in seqs:
            i = 0
            while i < len(seq) - 1:
                if seq[i] == left and seq[i + 1] == right:
                    seq[i:i + 2] = [merged]
                i += 1
    return merges


@functools.lru_cache(maxsize=None)
def build_tokenizer(max_merges: int = 1400) -> Tokenizer:
    """Learn the shared tokenizer from the embedded corpus.

    Layout: control tokens, 256 byte-fallback tokens ``<0xXX>``, the corpus'
    characters, then merged pieces.  Merged pieces score ``-rank`` so that
    llama.cpp's SPM tokenizer (which merges the highest-scoring bigram first)
    replays the BPE merge order.  Spaces are stored as U+2581, as in
    SentencePiece; characters outside the vocabulary fall back to bytes.
    """
    text = _CORPUS.replace(" ", _SPACE)
    words = collections.Counter(_PRETOKEN_RE.findall(text))
    chars = sorted({c for word in words for c in word})
    merges = _learn_merges(words, max_merges)

    tokens = list(SPECIAL_TOKENS)
    scores = [0.0] * len(tokens)
    types = [_TT_CONTROL] * len(tokens)
    types[UNK_ID] = _TT_UNKNOWN
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    scores += [0.0] * 256
    types += [_TT_BYTE] * 256
    seen = set(tokens)
    pieces = [(c, -float(len(merges) + i)) for i, c in enumerate(chars)]
    pieces += [(m, -float(rank)) for rank, m in enumerate(merges)]
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            scores.append(score)
            types.append(_TT_NORMAL)
    return Tokenizer(tuple(tokens), tuple(scores), tuple(types))


# ---------------------------------------------------------------------------
# Quantized block builders
# ---------------------------------------------------------------------------
# Each builder returns the raw bytes (as a uint8 array) of ``n`` values laid
# out in ggml blocks, with dequantized values ~ zero mean and the given std.

_Q4K_SUB_SCALE = 32          # all 8 sub-block scales and mins (6-bit values)
_UNIFORM16_STD = math.sqrt((16 ** 2 - 1) / 12)    # std of uniform {0..15}
_UNIFORM_I8_STD = math.sqrt((255 ** 2 - 1) / 12)  # std of uniform {-127..127}
# kvalues_mxfp4 (= 2 * E2M1), all 16 codes equally likely.
_MXFP4_STD = math.sqrt(np.mean(np.square(
    [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12])))

_Q4K_DTYPE = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
_Q8_0_DTYPE = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
_MXFP4_DTYPE = np.dtype([("e", "u1"), ("qs", "u1", 16)])


def _q4_k_scales(s: int) -> np.ndarray:
    """Pack eight (scale, min) pairs all equal to the 6-bit value ``s``.

    Mirrors get_scale_min_k4 in ggml-quants.c: bytes 0-3 hold scales 0-3 plus
    the top 2 bits of scales 4-7, bytes 4-7 the same for mins, bytes 8-11 the
    low nibbles of scales 4-7 (low) and mins 4-7 (high).
    """
    lo, hi = s & 0xF, s >> 4
    return np.array([s | hi << 6] * 8 + [lo | lo << 4] * 4, dtype=np.uint8)


def _q4_k(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """Q4_K: w = d*S*q - dmin*S with q uniform in 0..15.

    With dmin = 7.5*d the mean is zero and std = d*S*4.61.
    """
    blocks = np.empty(n // 256, dtype=_Q4K_DTYPE)
    d = np.float16(std / (_Q4K_SUB_SCALE * _UNIFORM16_STD))
    blocks["d"] = d
    blocks["dmin"] = np.float16(7.5 * float(d))
    blocks["scales"] = _q4_k_scales(_Q4K_SUB_SCALE)
    blocks["qs"] = rng.integers(0, 256, size=(len(blocks), 128), dtype=np.uint8)
    return blocks.view(np.uint8)


def _q8_0(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """Q8_0: w = d*q with q uniform in -127..127 (zero mean, std = 73.6*d)."""
    blocks = np.empty(n // 32, dtype=_Q8_0_DTYPE)
    blocks["d"] = np.float16(std / _UNIFORM_I8_STD)
    blocks["qs"] = rng.integers(-127, 128, size=(len(blocks), 32), dtype=np.int8)
    return blocks.view(np.uint8)


def _mxfp4(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """MXFP4: w = kvalue[code] * 2^(e-128) with uniform codes (symmetric, zero mean).

    The shared E8M0 exponent only allows powers of two, so the std lands
    within a factor sqrt(2) of the target.
    """
    blocks = np.empty(n // 32, dtype=_MXFP4_DTYPE)
    blocks["e"] = 128 + round(math.log2(std / _MXFP4_STD))
    blocks["qs"] = rng.integers(0, 256, size=(len(blocks), 16), dtype=np.uint8)
    return blocks.view(np.uint8)


def _float(dtype: type) -> Callable[[np.random.Generator, int, float], np.ndarray]:
    """Plain F16/F32 tensors: Gaussian values."""
    def build(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
        values = rng.standard_normal(n, dtype=np.float32) * np.float32(std)
        return values.astype(dtype).view(np.uint8)
    return build


_BUILDERS: dict[QType, Callable[[np.random.Generator, int, float], np.ndarray]] = {
    QType.Q4_K: _q4_k,
    QType.Q8_0: _q8_0,
    QType.MXFP4: _mxfp4,
    QType.F16: _float(np.float16),
    QType.F32: _float(np.float32),
}
# Float types whose tensors can carry exact construction values (routing).
_FLOAT_DTYPES: dict[QType, type] = {QType.F16: np.float16, QType.F32: np.float32}
_EMBD_STD = 1.0  # token embeddings: unit-variance rows (the residual stream starts at rms ~1)


# ---------------------------------------------------------------------------
# Model specs and presets
# ---------------------------------------------------------------------------

ARCHES = ("qwen3moe", "deepseek2", "gpt-oss", "qwen3")


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
    """Realistic routing for a ``qwen3moe`` model (docs/ROUTING.md explains and calibrates it).

    Random weights route almost uniformly.  With a RoutingSpec the embeddings, layer 0's
    attention and every router are built so that, at the nominal residual composition, the router
    logits of every MoE layer are (in nats)

        logit_e(t) = -bias * ln(rank_e) + token * z_e(t) + context * y_e(t)

    * ``rank_e``: the expert's popularity rank under a random permutation drawn per layer
      (Zipf-like skew, read from a constant direction of the residual stream);
    * ``z_e(t)``: a fixed random function of the current token, std 1 (token subspace);
    * ``y_e(t)``: a fixed random linear function of the recent tokens, averaged by layer 0's
      attention head 0 with a causal Gaussian window of std ``window`` tokens (context
      subspace), std 1 when the recent tokens are unrelated.

    Routing statistics depend on the ratios only (top-k ignores a common scale); ``token`` sets
    the softmax temperature and so the mixing weights.  The defaults are calibrated so that
    teacher-forced decoding of Python source reproduces Qwen3-30B-A3B's published statistics.
    """

    bias: float = 1.3           # nats per ln(rank)
    token: float = 1.5          # nats, std over experts of the token part
    context: float = 1.7        # nats, nominal std of the context part
    window: float = 12.0        # tokens, std of the causal Gaussian recency window
    amplitude: float = 16.0     # residual value per routing dimension; other dims are ~1
    n_const: int = 16           # dimensions of the constant direction (the bias carrier)
    band_top: float = 0.5       # recency head uses RoPE pairs with theta in
    band_ratio: float = 1e-3    #   [band_top/window * band_ratio, band_top/window]


@dataclasses.dataclass(frozen=True)
class RoutingLayout:
    """Where a RoutingSpec puts things in a given model shape (derived, see routing_layout)."""

    const: slice                # residual dims of the constant direction c
    token: slice                # residual dims of the token vectors u_t (head_dim of them)
    context: slice              # residual dims written by layer 0's head 0 (head_dim of them)
    pairs: tuple[int, ...]      # RoPE pairs (first members) carrying the recency head's q and k
    height: float               # score(0) - score(far): recency scores are height * mean_i cos(theta_i d)
    norm_gain: float            # attn_q_norm / attn_k_norm weight on the recency pairs
    rms_in: float               # nominal rms of an embedding row (layer 0's attention input)
    rms: float                  # nominal rms of the residual after layer 0's attention
    context_gain: float         # head 0's output gain: nominal |context| = amplitude * sqrt(head_dim)

    @property
    def n_routing_dims(self) -> int:
        return self.context.stop


def rope_thetas(spec: ModelSpec) -> np.ndarray:
    """RoPE angle per position of each (NEOX) pair: freq_base^(-2i/head_dim)."""
    return spec.rope_freq_base ** (-2.0 * np.arange(spec.head_dim // 2) / spec.head_dim)


def _recency_weights(theta: np.ndarray, height: float, n: int) -> np.ndarray:
    s = height * np.cos(np.outer(np.arange(n, dtype=np.float64), theta)).mean(axis=1)
    w = np.exp(s - s.max())
    return w / w.sum()


def recency_weights(spec: ModelSpec, n: int) -> np.ndarray:
    """Attention weights of layer 0's head 0 over the keys d = 0 .. n-1 tokens back, at a
    position with n keys: softmax of height * mean_i cos(theta_i d) (q.k after RoPE)."""
    layout = routing_layout(spec)
    return _recency_weights(rope_thetas(spec)[list(layout.pairs)], layout.height, n)


@functools.lru_cache(maxsize=None)
def routing_layout(spec: ModelSpec) -> RoutingLayout:
    """Dimensions, RoPE pairs and gains of ``spec.routing``; raises ValueError if it does not fit."""
    r = spec.routing
    hd = spec.head_dim
    n_const = r.n_const
    n_routing = n_const + 2 * hd
    if n_routing > spec.n_embd // 2:
        raise ValueError(f"routing needs n_embd >= 2 * (n_const + 2 * head_dim) = {2 * n_routing}")
    theta = rope_thetas(spec)
    top = r.band_top / r.window
    pairs = np.flatnonzero((theta <= top) & (theta >= top * r.band_ratio))
    if len(pairs) < 6:
        raise ValueError(f"routing: only {len(pairs)} RoPE pairs in the recency band; widen band_ratio")
    # Near d = 0, height * mean cos(theta d) ~ height - height * mean(theta^2) d^2 / 2: a Gaussian of std window.
    height = 1.0 / (r.window ** 2 * float(np.mean(theta[pairs] ** 2)))
    if height < 20:
        raise ValueError(f"routing: recency height {height:.1f} < 20 leaks attention to far tokens; "
                         "lower band_top")
    # q and k of head 0 are sqrt(hd/K) on the K pairs after their RMS norm; times norm_gain each,
    # q.k / sqrt(hd) = norm_gain^2 * sqrt(hd) * mean cos, which must be height * mean cos.
    norm_gain = math.sqrt(height / math.sqrt(hd))
    n_free = spec.n_embd - n_routing
    amp2 = r.amplitude ** 2
    rms_in = math.sqrt(((n_const + hd) * amp2 + n_free * _EMBD_STD ** 2) / spec.n_embd)
    rms = math.sqrt((n_routing * amp2 + n_free * _EMBD_STD ** 2) / spec.n_embd)
    w = _recency_weights(theta[pairs], height, 4096)
    # head 0 averages v = P x_tok (P orthogonal, |x_tok| = amplitude sqrt(hd) / rms_in); for
    # unrelated tokens |sum_d w_d v_d| = sqrt(sum w^2) |v|; wo maps it (orthogonally) to the context dims.
    context_gain = rms_in / math.sqrt(float(np.sum(w ** 2)))
    return RoutingLayout(
        const=slice(0, n_const), token=slice(n_const, n_const + hd),
        context=slice(n_const + hd, n_routing), pairs=tuple(int(p) for p in pairs),
        height=height, norm_gain=norm_gain, rms_in=rms_in, rms=rms, context_gain=context_gain)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shapes and hyper-parameters of a synthetic model.

    Field meaning follows the GGUF keys.  Fields that an architecture does not
    use are ignored (e.g. MLA ranks outside deepseek2); ``n_expert == 0``
    means a dense model.  The vocabulary always comes from the shared
    tokenizer.
    """

    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int                      # q/k head size (deepseek2: qk_nope + qk_rope)
    n_ff: int                          # dense FFN width (dense archs, leading dense layers)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0                  # routed expert FFN width
    n_expert_shared: int = 0           # deepseek2 shared experts (width n_ff_exp each)
    n_layer_dense_lead: int = 0        # deepseek2 leading dense layers
    expert_qtype: QType = QType.Q4_K
    dense_qtype: QType = QType.F16     # attention, dense FFN, embeddings, output
    context_length: int = 4096
    rope_freq_base: float = 1_000_000.0
    rms_eps: float = 1e-6
    # deepseek2 multi-head latent attention
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0                # qk_nope_dim is head_dim - qk_rope_dim
    expert_gating_func: int = 1        # 1 softmax, 2 sigmoid (llama_expert_gating_func_type)
    expert_weights_scale: float = 1.0
    expert_weights_norm: bool = False
    # gpt-oss sliding-window attention (every other layer, starting with layer 0)
    sliding_window: int = 0
    # qwen3moe only: structured embeddings, layer-0 attention and routers (None: all random)
    routing: RoutingSpec | None = None

    @property
    def n_vocab(self) -> int:
        """Vocabulary size, fixed by the shared tokenizer."""
        return len(build_tokenizer().tokens)

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"unsupported arch {self.arch!r}; choose from {ARCHES}")
        if (self.n_expert > 0) != (self.arch != "qwen3"):
            raise ValueError(f"{self.arch}: n_expert must be > 0 exactly for MoE arches")
        if self.n_expert and not 0 < self.n_expert_used <= self.n_expert:
            raise ValueError("need 0 < n_expert_used <= n_expert")
        # llama.cpp decides "lite" (no q_lora, plain attn_q) from the layer count alone.
        if self.arch == "deepseek2" and (self.n_layer in (26, 27)) != (self.q_lora_rank == 0):
            raise ValueError("deepseek2: llama.cpp requires q_lora_rank == 0 exactly when n_layer is 26 or 27")
        if self.routing is not None:
            if self.arch != "qwen3moe":
                raise ValueError(f"routing is implemented for qwen3moe only, not {self.arch}")
            if self.dense_qtype not in _FLOAT_DTYPES:
                raise ValueError("routing needs F16 or F32 dense tensors (they carry the construction)")
            routing_layout(self)  # raises if the construction does not fit the shape


PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen3moe-tiny", arch="qwen3moe", n_layer=4, n_embd=256, n_head=4,
            n_head_kv=2, head_dim=64, n_ff=1024, n_expert=32, n_expert_used=4,
            n_ff_exp=256, expert_qtype=QType.Q4_K,
        ),
        ModelSpec(
            name="qwen3moe-30b-a3b", arch="qwen3moe", n_layer=48, n_embd=2048, n_head=32,
            n_head_kv=4, head_dim=128, n_ff=6144, n_expert=128, n_expert_used=8,
            n_ff_exp=768, expert_qtype=QType.Q4_K, context_length=40960,
        ),
        # Qwen3-30B-A3B's expert shapes (n_embd 2048, expert FFN 768, Q4_K, 8 of 32 used) in 4
        # layers: decodes in milliseconds per token on a CPU like a real model, so the machinery's
        # fixed per-node costs are measured against realistic expert work.
        ModelSpec(
            name="qwen3moe-mini", arch="qwen3moe", n_layer=4, n_embd=2048, n_head=16,
            n_head_kv=4, head_dim=128, n_ff=6144, n_expert=32, n_expert_used=8,
            n_ff_exp=768, expert_qtype=QType.Q4_K,
        ),
        # Qwen3-30B-A3B's shapes with realistic routing (RoutingSpec defaults, calibrated in
        # docs/ROUTING.md); every tensor outside the construction equals qwen3moe-30b-a3b's.
        ModelSpec(
            name="qwen3moe-30b-a3b-routed", arch="qwen3moe", n_layer=48, n_embd=2048, n_head=32,
            n_head_kv=4, head_dim=128, n_ff=6144, n_expert=128, n_expert_used=8,
            n_ff_exp=768, expert_qtype=QType.Q4_K, context_length=40960, routing=RoutingSpec(),
        ),
        # The same layers (128 experts, 8 used) in 4 layers, ~1.4 GiB: calibration and tests.
        ModelSpec(
            name="qwen3moe-routed-mini", arch="qwen3moe", n_layer=4, n_embd=2048, n_head=32,
            n_head_kv=4, head_dim=128, n_ff=6144, n_expert=128, n_expert_used=8,
            n_ff_exp=768, expert_qtype=QType.Q4_K, context_length=40960, routing=RoutingSpec(),
        ),
        ModelSpec(
            name="deepseek2-tiny", arch="deepseek2", n_layer=4, n_embd=256, n_head=4,
            n_head_kv=1, head_dim=96, n_ff=512, n_expert=32, n_expert_used=4,
            n_ff_exp=128, n_expert_shared=1, n_layer_dense_lead=1,
            expert_qtype=QType.Q8_0, rope_freq_base=10_000.0, q_lora_rank=128,
            kv_lora_rank=128, qk_rope_dim=32, v_head_dim=64, expert_gating_func=2,
            expert_weights_scale=2.5, expert_weights_norm=True,
        ),
        ModelSpec(
            name="gptoss-tiny", arch="gpt-oss", n_layer=4, n_embd=256, n_head=8,
            n_head_kv=2, head_dim=64, n_ff=256, n_expert=32, n_expert_used=4,
            n_ff_exp=256, expert_qtype=QType.MXFP4, rope_freq_base=150_000.0,
            rms_eps=1e-5, sliding_window=64,
        ),
        ModelSpec(
            name="dense-tiny", arch="qwen3", n_layer=4, n_embd=256, n_head=4,
            n_head_kv=2, head_dim=64, n_ff=768,
        ),
    )
}


# ---------------------------------------------------------------------------
# Tensor plans (names and shapes follow src/llama-arch.cpp and src/models/*.cpp)
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: ggml shape (ne0 first), type and init std.

    ``std=None`` means all ones (norm weights).  ``structure`` (routing
    only, F16/F32 tensors): ``structure(values, first_row, seed)`` edits a
    chunk's float values [rows, ne0] in place after the random draw.
    """

    name: str
    ne: tuple[int, ...]
    qtype: QType
    std: float | None
    structure: Callable[[np.ndarray, int, int], None] | None = None

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.n_elements // block * size


_BIAS_STD = 0.02


def _weight(name: str, ne: tuple[int, ...], qtype: QType) -> TensorPlan:
    """A matmul weight: std 1/sqrt(fan_in), fan_in being the row length ne0."""
    return TensorPlan(name, ne, qtype, 1.0 / math.sqrt(ne[0]))


def _norm(name: str, n: int) -> TensorPlan:
    return TensorPlan(name, (n,), QType.F32, None)


def _small(name: str, ne: tuple[int, ...], std: float = _BIAS_STD) -> TensorPlan:
    """Biases, sinks and similar F32 tensors with small random values."""
    return TensorPlan(name, ne, QType.F32, std)


def _gqa_attention(spec: ModelSpec, p: str, qk_norm: bool) -> list[TensorPlan]:
    q_dim, kv_dim, t = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim, spec.dense_qtype
    plans = [
        _weight(f"{p}.attn_q.weight", (spec.n_embd, q_dim), t),
        _weight(f"{p}.attn_k.weight", (spec.n_embd, kv_dim), t),
        _weight(f"{p}.attn_v.weight", (spec.n_embd, kv_dim), t),
        _weight(f"{p}.attn_output.weight", (q_dim, spec.n_embd), t),
    ]
    if qk_norm:
        plans += [_norm(f"{p}.attn_q_norm.weight", spec.head_dim),
                  _norm(f"{p}.attn_k_norm.weight", spec.head_dim)]
    return plans


def _mla_attention(spec: ModelSpec, p: str) -> list[TensorPlan]:
    """DeepSeek multi-head latent attention, with wkv_b pre-split into k_b/v_b.

    Providing attn_k_b/attn_v_b (and key/value_length_mla) selects llama.cpp's
    absorbed MLA path, which caches only the compressed latent (n_head_kv 1).
    """
    t, nope, q_dim = spec.dense_qtype, spec.head_dim - spec.qk_rope_dim, spec.n_head * spec.head_dim
    if spec.q_lora_rank:
        q = [_weight(f"{p}.attn_q_a.weight", (spec.n_embd, spec.q_lora_rank), t),
             _norm(f"{p}.attn_q_a_norm.weight", spec.q_lora_rank),
             _weight(f"{p}.attn_q_b.weight", (spec.q_lora_rank, q_dim), t)]
    else:  # "lite" variants (DeepSeek-V2-Lite) project q directly
        q = [_weight(f"{p}.attn_q.weight", (spec.n_embd, q_dim), t)]
    return [
        *q,
        _weight(f"{p}.attn_kv_a_mqa.weight", (spec.n_embd, spec.kv_lora_rank + spec.qk_rope_dim), t),
        _norm(f"{p}.attn_kv_a_norm.weight", spec.kv_lora_rank),
        _weight(f"{p}.attn_k_b.weight", (nope, spec.kv_lora_rank, spec.n_head), t),
        _weight(f"{p}.attn_v_b.weight", (spec.kv_lora_rank, spec.v_head_dim, spec.n_head), t),
        _weight(f"{p}.attn_output.weight", (spec.n_head * spec.v_head_dim, spec.n_embd), t),
    ]


def _dense_ffn(spec: ModelSpec, p: str, suffix: str = "", n_ff: int | None = None) -> list[TensorPlan]:
    n_ff, t = n_ff or spec.n_ff, spec.dense_qtype
    return [
        _weight(f"{p}.ffn_gate{suffix}.weight", (spec.n_embd, n_ff), t),
        _weight(f"{p}.ffn_up{suffix}.weight", (spec.n_embd, n_ff), t),
        _weight(f"{p}.ffn_down{suffix}.weight", (n_ff, spec.n_embd), t),
    ]


def _router(spec: ModelSpec, p: str) -> TensorPlan:
    return _weight(f"{p}.ffn_gate_inp.weight", (spec.n_embd, spec.n_expert), QType.F32)


def _experts(spec: ModelSpec, p: str, merged_gate_up: bool) -> list[TensorPlan]:
    e, ff, t = spec.n_expert, spec.n_ff_exp, spec.expert_qtype
    if merged_gate_up:
        # gate rows [0, ff) then up rows [ff, 2ff) per expert (build_moe_ffn views).
        gate_up = [_weight(f"{p}.ffn_gate_up_exps.weight", (spec.n_embd, 2 * ff, e), t)]
    else:
        gate_up = [_weight(f"{p}.ffn_gate_exps.weight", (spec.n_embd, ff, e), t),
                   _weight(f"{p}.ffn_up_exps.weight", (spec.n_embd, ff, e), t)]
    return gate_up + [_weight(f"{p}.ffn_down_exps.weight", (ff, spec.n_embd, e), t)]


def _qwen3moe_layer(spec: ModelSpec, p: str, il: int) -> list[TensorPlan]:
    return [
        _norm(f"{p}.attn_norm.weight", spec.n_embd),
        *_gqa_attention(spec, p, qk_norm=True),
        _norm(f"{p}.ffn_norm.weight", spec.n_embd),
        _router(spec, p),
        *_experts(spec, p, merged_gate_up=False),
    ]


def _qwen3_layer(spec: ModelSpec, p: str, il: int) -> list[TensorPlan]:
    return [
        _norm(f"{p}.attn_norm.weight", spec.n_embd),
        *_gqa_attention(spec, p, qk_norm=True),
        _norm(f"{p}.ffn_norm.weight", spec.n_embd),
        *_dense_ffn(spec, p),
    ]


def _deepseek2_layer(spec: ModelSpec, p: str, il: int) -> list[TensorPlan]:
    plans = [_norm(f"{p}.attn_norm.weight", spec.n_embd), *_mla_attention(spec, p),
             _norm(f"{p}.ffn_norm.weight", spec.n_embd)]
    if il < spec.n_layer_dense_lead:
        return plans + _dense_ffn(spec, p)
    return plans + [
        _router(spec, p),
        _small(f"{p}.exp_probs_b.bias", (spec.n_expert,)),
        *_experts(spec, p, merged_gate_up=True),
        *_dense_ffn(spec, p, "_shexp", spec.n_ff_exp * spec.n_expert_shared),
    ]


def _gptoss_layer(spec: ModelSpec, p: str, il: int) -> list[TensorPlan]:
    q_dim, kv_dim = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
    e, ff = spec.n_expert, spec.n_ff_exp
    return [
        _norm(f"{p}.attn_norm.weight", spec.n_embd),
        *_gqa_attention(spec, p, qk_norm=False),
        _small(f"{p}.attn_q.bias", (q_dim,)),
        _small(f"{p}.attn_k.bias", (kv_dim,)),
        _small(f"{p}.attn_v.bias", (kv_dim,)),
        _small(f"{p}.attn_output.bias", (spec.n_embd,)),
        _small(f"{p}.attn_sinks.weight", (spec.n_head,), std=0.5),
        _norm(f"{p}.post_attention_norm.weight", spec.n_embd),
        _router(spec, p),
        _small(f"{p}.ffn_gate_inp.bias", (e,)),
        *_experts(spec, p, merged_gate_up=False),
        # Per-expert biases, applied with GGML_OP_ADD_ID.
        _small(f"{p}.ffn_gate_exps.bias", (ff, e)),
        _small(f"{p}.ffn_up_exps.bias", (ff, e)),
        _small(f"{p}.ffn_down_exps.bias", (spec.n_embd, e)),
    ]


_LAYER_PLANNERS: dict[str, Callable[[ModelSpec, str, int], list[TensorPlan]]] = {
    "qwen3moe": _qwen3moe_layer,
    "qwen3": _qwen3_layer,
    "deepseek2": _deepseek2_layer,
    "gpt-oss": _gptoss_layer,
}


# ---------------------------------------------------------------------------
# Realistic routing (RoutingSpec): the tensors that carry the construction
# ---------------------------------------------------------------------------
# Residual dims [const | token | context | free...]: embeddings are amplitude on const, a token
# vector u_t (norm amplitude * sqrt(head_dim)) on token, 0 on context, N(0, 1) on free.  Layer 0's
# head 0 reads const for q and k (constant vectors on the recency pairs, so that after RoPE
# q_i.k_j depends on i - j only) and token for v, and writes the recency-weighted average of v
# into context.  Routers read const (bias), token and context only.  Everything else is drawn as
# without routing (natural scales), so it perturbs the routing subspace by ~1/amplitude.
# Each function edits values [rows, ne0] (rows first_row ...) of one chunk in place; its random
# matrices come from their own seeded RNG, so chunks agree.

def _routing_rng(seed: int, what: str) -> np.random.Generator:
    return np.random.default_rng([seed, _name_key("routing." + what)])


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _rows(values: np.ndarray, first_row: int, lo: int, hi: int) -> tuple[slice, slice]:
    """The chunk rows (local slice) holding global rows [lo, hi), and their global slice."""
    a, b = max(lo, first_row), min(hi, first_row + len(values))
    return slice(a - first_row, max(a, b) - first_row), slice(a, max(a, b))


def token_vectors(spec: ModelSpec, seed: int = 0) -> np.ndarray:
    """u_t for every token: float64 [n_vocab, head_dim], each of norm amplitude * sqrt(head_dim)."""
    g = _routing_rng(seed, "token_vectors").standard_normal((spec.n_vocab, spec.head_dim))
    return g * (spec.routing.amplitude * math.sqrt(spec.head_dim) / np.linalg.norm(g, axis=1, keepdims=True))


def _embd_structure(spec: ModelSpec, values: np.ndarray, first_row: int, seed: int) -> None:
    lay, n = routing_layout(spec), len(values)
    values[:, lay.const] = spec.routing.amplitude
    values[:, lay.token] = token_vectors(spec, seed)[first_row:first_row + n]
    values[:, lay.context] = 0.0


def _qk_structure(spec: ModelSpec, values: np.ndarray, first_row: int, seed: int) -> None:
    """Head 0 (q) / KV head 0 (k): rows of the recency pairs read const, the other rows are 0."""
    lay = routing_layout(spec)
    local, _ = _rows(values, first_row, 0, spec.head_dim)
    values[local] = 0.0
    for pair in lay.pairs:
        if first_row <= pair < first_row + len(values):
            values[pair - first_row, lay.const] = 1.0 / math.sqrt(spec.routing.n_const)


def _qk_norm_structure(spec: ModelSpec, values: np.ndarray, first_row: int, seed: int) -> None:
    lay, half = routing_layout(spec), spec.head_dim // 2
    pairs = np.array(lay.pairs)
    values[0, pairs] = values[0, pairs + half] = lay.norm_gain


def _v_structure(spec: ModelSpec, values: np.ndarray, first_row: int, seed: int) -> None:
    """KV head 0: v = P x_token, P a random orthogonal map."""
    lay = routing_layout(spec)
    local, rows = _rows(values, first_row, 0, spec.head_dim)
    values[local] = 0.0
    values[local, lay.token] = _orthogonal(_routing_rng(seed, "value_map"), spec.head_dim)[rows]


def _wo_structure(spec: ModelSpec, values: np.ndarray, first_row: int, seed: int) -> None:
    """Head 0's output columns: context_gain * Q (random orthogonal) into the context rows, 0 elsewhere."""
    lay, hd = routing_layout(spec), spec.head_dim
    values[:, :hd] = 0.0
    local, rows = _rows(values, first_row, lay.context.start, lay.context.stop)
    q = _orthogonal(_routing_rng(seed, "context_map"), hd)
    values[local, :hd] = lay.context_gain * q[rows.start - lay.context.start:rows.stop - lay.context.start]


def router_logit_parts(spec: ModelSpec, layer: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer ``layer``'s router parts in nats at the nominal composition: bias [n_expert] (mean 0),
    token rows [n_expert, head_dim] and context rows [n_expert, head_dim] (unit-variance Gaussian,
    times ``token`` / ``context``)."""
    r, e = spec.routing, spec.n_expert
    rng = _routing_rng(seed, f"router.{layer}")
    bias = np.empty(e)
    bias[rng.permutation(e)] = -r.bias * np.log(np.arange(1, e + 1))
    bias -= bias.mean()
    return bias, r.token * rng.standard_normal((e, spec.head_dim)), r.context * rng.standard_normal((e, spec.head_dim))


def _router_structure(spec: ModelSpec, layer: int, values: np.ndarray, first_row: int, seed: int) -> None:
    """Rows are experts.  x = h / rms(h) has amplitude / rms on each routing dim at the nominal
    composition, so each part is divided by that (and by its norm) to come out in nats."""
    r, lay, n = spec.routing, routing_layout(spec), len(values)
    bias, tok, ctx = (part[first_row:first_row + n] for part in router_logit_parts(spec, layer, seed))
    unit = lay.rms / r.amplitude
    values[:] = 0.0
    values[:, lay.const] = (bias * unit / r.n_const)[:, None]
    values[:, lay.token] = tok * unit / math.sqrt(spec.head_dim)
    values[:, lay.context] = ctx * unit / math.sqrt(spec.head_dim)


def _output_norm_structure(spec: ModelSpec, values: np.ndarray, first_row: int, seed: int) -> None:
    """The output head reads the free dims only (at the scale an rms-1 residual would give), so
    logits follow the attention and expert outputs, not the routing carriers."""
    lay = routing_layout(spec)
    values[0, :lay.n_routing_dims] = 0.0
    values[0, lay.n_routing_dims:] = lay.rms


_ROUTING_STRUCTURE: dict[str, Callable[..., None]] = {
    "token_embd.weight": _embd_structure,
    "blk.0.attn_q.weight": _qk_structure,
    "blk.0.attn_k.weight": _qk_structure,
    "blk.0.attn_q_norm.weight": _qk_norm_structure,
    "blk.0.attn_k_norm.weight": _qk_norm_structure,
    "blk.0.attn_v.weight": _v_structure,
    "blk.0.attn_output.weight": _wo_structure,
    "output_norm.weight": _output_norm_structure,
}


def _with_routing(spec: ModelSpec, plan: TensorPlan) -> TensorPlan:
    """``plan`` with its part of the routing construction attached (unchanged if it has none)."""
    if plan.name in _ROUTING_STRUCTURE:
        structure = functools.partial(_ROUTING_STRUCTURE[plan.name], spec)
    elif plan.name.endswith(".ffn_gate_inp.weight"):
        structure = functools.partial(_router_structure, spec, int(plan.name.split(".")[1]))
    else:
        return plan
    if plan.qtype not in _FLOAT_DTYPES:
        raise ValueError(f"routing: {plan.name} must be F16 or F32, not {plan.qtype.name}")
    return dataclasses.replace(plan, structure=structure)


def plan_tensors(spec: ModelSpec) -> list[TensorPlan]:
    """All tensors of ``spec`` in file order, without generating any data."""
    n_vocab = spec.n_vocab
    plans = [TensorPlan("token_embd.weight", (spec.n_embd, n_vocab), spec.dense_qtype, _EMBD_STD)]
    for il in range(spec.n_layer):
        plans += _LAYER_PLANNERS[spec.arch](spec, f"blk.{il}", il)
    plans += [_norm("output_norm.weight", spec.n_embd),
              _weight("output.weight", (spec.n_embd, n_vocab), spec.dense_qtype)]
    if spec.routing is not None:
        plans = [_with_routing(spec, plan) for plan in plans]
    for plan in plans:
        block = gguf.GGML_QUANT_SIZES[plan.qtype][0]
        if plan.ne[0] % block:
            raise ValueError(f"{plan.name}: row length {plan.ne[0]} not a multiple of "
                             f"the {plan.qtype.name} block size {block}")
    return plans


def estimate_file_size(spec: ModelSpec) -> int:
    """Size of the tensor data section; the file adds a few tens of KB of metadata."""
    return sum(gguf.GGUFWriter.ggml_pad(p.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT)
               for p in plan_tensors(spec))


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------

_FILE_TYPES = {
    QType.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
    QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QType.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
    QType.F16: gguf.LlamaFileType.MOSTLY_F16,
    QType.F32: gguf.LlamaFileType.ALL_F32,
}

_V = gguf.GGUFValueType


def _arch_kv(spec: ModelSpec) -> dict[str, tuple[object, gguf.GGUFValueType]]:
    """``{arch}.*`` keys: the common ones plus what each arch's loader requires."""
    kv: dict[str, tuple[object, gguf.GGUFValueType]] = {
        "context_length": (spec.context_length, _V.UINT32),
        "embedding_length": (spec.n_embd, _V.UINT32),
        "block_count": (spec.n_layer, _V.UINT32),
        "feed_forward_length": (spec.n_ff, _V.UINT32),
        "attention.head_count": (spec.n_head, _V.UINT32),
        "attention.head_count_kv": (spec.n_head_kv, _V.UINT32),
        "attention.key_length": (spec.head_dim, _V.UINT32),
        "attention.value_length": (spec.head_dim, _V.UINT32),
        "attention.layer_norm_rms_epsilon": (spec.rms_eps, _V.FLOAT32),
        "rope.freq_base": (spec.rope_freq_base, _V.FLOAT32),
    }
    if spec.n_expert:
        kv["expert_count"] = (spec.n_expert, _V.UINT32)
        kv["expert_used_count"] = (spec.n_expert_used, _V.UINT32)
        kv["expert_feed_forward_length"] = (spec.n_ff_exp, _V.UINT32)
    if spec.arch == "deepseek2":
        # MLA is stored as MQA over the latent: one KV head whose key is the
        # kv_lora latent plus the shared rope part and whose value is the latent;
        # the per-head sizes after decompression go in the *_mla keys.
        kv.update({
            "attention.head_count_kv": (1, _V.UINT32),
            "attention.key_length": (spec.kv_lora_rank + spec.qk_rope_dim, _V.UINT32),
            "attention.value_length": (spec.kv_lora_rank, _V.UINT32),
            "attention.key_length_mla": (spec.head_dim, _V.UINT32),
            "attention.value_length_mla": (spec.v_head_dim, _V.UINT32),
            "attention.kv_lora_rank": (spec.kv_lora_rank, _V.UINT32),
            "rope.dimension_count": (spec.qk_rope_dim, _V.UINT32),
            "leading_dense_block_count": (spec.n_layer_dense_lead, _V.UINT32),
            "expert_shared_count": (spec.n_expert_shared, _V.UINT32),
            "expert_weights_scale": (spec.expert_weights_scale, _V.FLOAT32),
            "expert_weights_norm": (spec.expert_weights_norm, _V.BOOL),
            "expert_gating_func": (spec.expert_gating_func, _V.UINT32),
        })
        if spec.q_lora_rank:
            kv["attention.q_lora_rank"] = (spec.q_lora_rank, _V.UINT32)
    if spec.arch == "gpt-oss":
        kv["attention.sliding_window"] = (spec.sliding_window, _V.UINT32)
    return kv


def _add_metadata(writer: gguf.GGUFWriter, spec: ModelSpec, tok: Tokenizer) -> None:
    writer.add_string("general.name", spec.name)
    writer.add_uint32("general.file_type", int(_FILE_TYPES[spec.expert_qtype if spec.n_expert else spec.dense_qtype]))
    writer.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    for key, (value, vtype) in _arch_kv(spec).items():
        writer.add_key_value(f"{spec.arch}.{key}", value, vtype)
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_key_value("tokenizer.ggml.tokens", list(tok.tokens), _V.ARRAY, _V.STRING)
    writer.add_key_value("tokenizer.ggml.scores", list(tok.scores), _V.ARRAY, _V.FLOAT32)
    writer.add_key_value("tokenizer.ggml.token_type", list(tok.token_types), _V.ARRAY, _V.INT32)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", UNK_ID)
    writer.add_uint32("tokenizer.ggml.bos_token_id", BOS_ID)
    writer.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)
    writer.add_uint32("tokenizer.ggml.eot_token_id", IM_END_ID)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)
    # No implicit leading space: "Hello" round-trips to "Hello", not " Hello".
    writer.add_bool("tokenizer.ggml.add_space_prefix", False)
    writer.add_string("tokenizer.chat_template", CHAT_TEMPLATE)


# ---------------------------------------------------------------------------
# Streaming writer
# ---------------------------------------------------------------------------

# Tensors are generated in chunks of whole rows of at most this many elements.
# Chunk boundaries (and hence the bytes) depend only on the tensor shape.
_CHUNK_ELEMENTS = 1 << 21


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _tensor_chunks(plan: TensorPlan, seed: int) -> Iterator[np.ndarray]:
    """Yield the tensor's raw bytes chunk by chunk, each from its own RNG."""
    row = plan.ne[0]
    n_rows = plan.n_elements // row
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // row)
    build = _BUILDERS[plan.qtype]
    key = _name_key(plan.name)
    for index, start in enumerate(range(0, n_rows, rows_per_chunk)):
        n = min(rows_per_chunk, n_rows - start) * row
        if plan.structure is not None:
            # The same draw as the float builders, then the construction edits it.
            if plan.std is None:
                values = np.ones(n, dtype=np.float32)
            else:
                values = np.random.default_rng([seed, key, index]).standard_normal(n, dtype=np.float32)
                values *= np.float32(plan.std)
            values = values.reshape(-1, row)
            plan.structure(values, start, seed)
            yield values.astype(_FLOAT_DTYPES[plan.qtype]).view(np.uint8).reshape(-1)
        elif plan.std is None:
            yield np.ones(n, dtype=np.float32).view(np.uint8)
        else:
            yield build(np.random.default_rng([seed, key, index]), n, plan.std)


def _resolve(spec: ModelSpec | str) -> ModelSpec:
    if isinstance(spec, ModelSpec):
        return spec
    try:
        return PRESETS[spec]
    except KeyError:
        raise ValueError(f"unknown preset {spec!r}; choose from {sorted(PRESETS)}") from None


def synth_model(
    path: str | Path,
    spec_or_preset_name: ModelSpec | str,
    *,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write a synthetic GGUF model for ``spec_or_preset_name`` to ``path``.

    Memory use is bounded by one chunk (``_CHUNK_ELEMENTS`` values) however
    large the model is.  ``progress(tensor_name, bytes_done, bytes_total)`` is
    called after each tensor.  Returns the path.
    """
    spec = _resolve(spec_or_preset_name)
    path = Path(path)
    tok = build_tokenizer()
    plans = plan_tensors(spec)

    writer = gguf.GGUFWriter(path, spec.arch)
    try:
        _add_metadata(writer, spec, tok)
        for plan in plans:
            byte_shape = (*reversed(plan.ne[1:]), plan.nbytes // math.prod(plan.ne[1:]))
            writer.add_tensor_info(plan.name, byte_shape, np.dtype(np.uint8), plan.nbytes,
                                   raw_dtype=plan.qtype)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        (fout,) = writer.fout
        total, done = sum(p.nbytes for p in plans), 0
        for plan in plans:
            # Tensor offsets are multiples of the alignment, counted from the
            # (aligned) start of the data section, so align before each tensor.
            writer.write_padding(fout, fout.tell())
            written = 0
            for chunk in _tensor_chunks(plan, seed):
                chunk.tofile(fout)
                written += chunk.nbytes
            assert written == plan.nbytes, (plan.name, written, plan.nbytes)
            done += written
            if progress is not None:
                progress(plan.name, done, total)
        writer.write_padding(fout, fout.tell())
    finally:
        writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a deterministic synthetic (MoE) GGUF model that stock llama.cpp can run.")
    parser.add_argument("preset", choices=sorted(PRESETS), help="model preset")
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)

    spec = PRESETS[args.preset]
    print(f"{args.preset}: ~{estimate_file_size(spec) / 2**20:.1f} MiB -> {args.out}", file=sys.stderr)
    start = time.monotonic()

    def report(name: str, done: int, total: int) -> None:
        print(f"\r{100 * done / total:5.1f}% {name:<40}", end="", file=sys.stderr, flush=True)

    synth_model(args.out, spec, seed=args.seed, progress=report)
    print(f"\ndone in {time.monotonic() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
