"""Routing profiles: how often each expert of each MoE layer was routed to, kept across runs.

A profile seeds the policy before the first token (which experts to load at start-up) and stays a
prior beside the routing llamahot observes (llamahot.policy: `set_prior`). It is recorded by use
(`Llama(..., routing_profile=PATH)` adds what it observed when it closes) or from a text
(`llamahot profile MODEL TEXT PATH`, by prompt processing: the routing a teacher-forced decode
over the text would see, at prefill speed).

The file is a numpy .npz: `counts` float64 [n_layers, n_expert] (routings per expert), `blocks`
int32 [n_layers] (the model's block index of each row) and `meta` (JSON: format, arch, n_expert,
n_expert_used, model file name). Rows are matched by block, so a profile serves any
resident_layers setting of its model.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamahot.model_info import MoELayout

FORMAT = 1
# Older routing fades once a profile holds more than this many tokens' worth (per layer): a profile
# follows what the model is used for now, and its numbers stay far from float64 trouble.
MEMORY_TOKENS = float(1 << 20)


@dataclass
class RoutingProfile:
    blocks: np.ndarray      # int32 [n_layers]: block index of each row
    counts: np.ndarray      # float64 [n_layers, n_expert]: routings per expert
    arch: str
    n_expert_used: int
    model: str              # the model file's name (a hint: a profile may serve other quantizations)

    @classmethod
    def empty(cls, layout: MoELayout) -> "RoutingProfile":
        return cls(np.asarray(layout.moe_blocks, dtype=np.int32),
                   np.zeros((layout.n_moe_layers, layout.n_expert)), layout.arch, layout.n_expert_used,
                   Path(layout.path).name)

    @property
    def tokens(self) -> np.ndarray:
        """Tokens recorded per layer (each token routes to n_expert_used experts)."""
        return self.counts.sum(axis=1) / self.n_expert_used

    def _for_layout(self, layout: MoELayout) -> tuple[np.ndarray, np.ndarray]:
        """(counts, tokens) of `layout`'s MoE layers in its order, zeros where the profile has no row."""
        row_of = {int(b): i for i, b in enumerate(self.blocks)}
        counts = np.zeros((layout.n_moe_layers, layout.n_expert))
        for layer, block in enumerate(layout.moe_blocks):
            if block in row_of:
                counts[layer] = self.counts[row_of[block]]
        return counts, counts.sum(axis=1) / self.n_expert_used

    def tokens_for(self, layout: MoELayout) -> np.ndarray:
        """Tokens recorded for each of `layout`'s MoE layers (0 where the profile has none)."""
        return self._for_layout(layout)[1]

    def rates(self, layout: MoELayout) -> np.ndarray:
        """float64 [layout's n_moe_layers, n_expert]: expected routings per token of each expert, 0 for
        layers the profile has not seen."""
        counts, tokens = self._for_layout(layout)
        return counts / np.maximum(tokens, 1e-300)[:, None]

    def add(self, layout: MoELayout, counts: np.ndarray) -> None:
        """Add routing counts [layout's n_moe_layers, n_expert] observed on `layout`'s layers."""
        over = self.tokens / MEMORY_TOKENS
        self.counts /= np.maximum(over, 1.0)[:, None]
        row_of = {int(b): i for i, b in enumerate(self.blocks)}
        for layer, block in enumerate(layout.moe_blocks):
            i = row_of.get(block)
            if i is None:
                self.blocks = np.append(self.blocks, np.int32(block))
                self.counts = np.vstack([self.counts, np.zeros((1, self.counts.shape[1]))])
                i = len(self.blocks) - 1
                row_of[block] = i
            self.counts[i] += counts[layer]

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (a temporary file in the same folder, then a rename): a reader or a crash
        never sees half a profile, and the previous one stays until the new one is complete."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "arch": self.arch, "n_expert": int(self.counts.shape[1]),
                "n_expert_used": self.n_expert_used, "model": self.model}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, counts=self.counts, blocks=self.blocks, meta=np.array(json.dumps(meta)))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_profile(path: str | os.PathLike, layout: MoELayout) -> RoutingProfile:
    """The profile at `path` for this model, or an empty one if there is no file yet. A file that is
    not a llamahot profile, or one recorded on a model of another shape, is an error (it is left as
    it is: the user decides)."""
    path = Path(path)
    if not path.exists():
        return RoutingProfile.empty(layout)
    what_to_do = f"delete {path} or pass another routing_profile path"
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            counts = np.asarray(data["counts"], dtype=np.float64)
            blocks = np.asarray(data["blocks"], dtype=np.int32)
    except Exception as exc:
        raise ValueError(f"{path} is not a llamahot routing profile ({exc}); {what_to_do}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a routing profile of format {meta.get('format')!r}, this llamahot reads "
                         f"format {FORMAT}; {what_to_do}")
    if (meta.get("arch"), meta.get("n_expert"), meta.get("n_expert_used")) != (layout.arch, layout.n_expert,
                                                                                layout.n_expert_used):
        raise ValueError(
            f"{path} was recorded on a {meta.get('arch')} model with {meta.get('n_expert')} experts per layer "
            f"({meta.get('n_expert_used')} used), but {Path(layout.path).name} is {layout.arch} with "
            f"{layout.n_expert} ({layout.n_expert_used} used); {what_to_do}")
    if counts.ndim != 2 or counts.shape != (len(blocks), layout.n_expert) or not np.isfinite(counts).all() \
            or (counts < 0).any():
        raise ValueError(f"{path} holds damaged routing counts (shape {counts.shape}); {what_to_do}")
    if not set(blocks.tolist()) <= set(range(layout.n_blocks)):
        raise ValueError(f"{path} names blocks this model does not have (it has {layout.n_blocks}); {what_to_do}")
    if meta.get("model") != Path(layout.path).name:
        warnings.warn(f"llamahot: routing profile {path} was recorded on {meta.get('model')}, not "
                      f"{Path(layout.path).name} (same shape: it is used)", stacklevel=3)
    return RoutingProfile(blocks, counts, layout.arch, layout.n_expert_used, str(meta.get("model")))


def record_profile(model_path: str, texts: list[bytes | list[int]], out: str | os.PathLike, *, window: int = 512,
                   max_tokens: int | None = None, **llama_kwargs) -> int:
    """Add the routing of `texts` (bytes, or token ids) to the profile `out` (made if missing), by prompt
    processing: each text is cut into windows of `window` tokens, each evaluated as a new prompt, as a
    teacher-forced decode over the text would route them. Returns the tokens recorded."""
    from llamahot.llama import Llama

    # logits_all: llama.cpp otherwise drops the rows whose logits are not wanted before the last layer,
    # whose routing would then be one token per prompt.
    llm = Llama(model_path, hot_experts=0, routing_profile=out, n_ctx=max(window, 64), n_batch=window,
                n_ubatch=window, logits_all=True, verbose=False, **llama_kwargs)
    recorded = 0
    try:
        for text in texts:
            ids = llm.tokenize(text, add_bos=False) if isinstance(text, bytes) else list(text)
            for start in range(0, len(ids), window):
                if max_tokens is not None and recorded >= max_tokens:
                    return recorded
                chunk = ids[start:start + window]
                if max_tokens is not None:
                    chunk = chunk[: max_tokens - recorded]
                llm.reset()
                llm.eval(chunk)
                recorded += len(chunk)
        return recorded
    finally:
        llm.close()   # adds the routing to the profile and writes it
