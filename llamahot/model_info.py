"""What llamahot needs to know about a GGUF model before llama.cpp loads it.

Read from the GGUF header only (tensor data is memory-mapped, never read), so a bad request
(`hot_experts` on a dense model, K larger than the expert count) fails in milliseconds instead of
after a long model load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

# Routed-expert tensors: weights, biases and scales of every per-expert projection.
# Used both to recognise MoE layers here and, as a regex, to place them in host memory.
EXPERT_TENSOR_PATTERN = r"\.ffn_(gate|up|down|gate_up)_exps\."
_EXPERT_WEIGHT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.weight$")
_EXPERT_ANY = re.compile(EXPERT_TENSOR_PATTERN)


@dataclass(frozen=True)
class MoELayout:
    """The routed-expert layout of a model."""

    path: str
    arch: str
    n_blocks: int
    n_expert: int
    n_expert_used: int
    moe_blocks: tuple[int, ...]       # block index of each MoE layer, in order
    projections: tuple[str, ...]      # e.g. ("gate", "up", "down") or ("gate_up", "down")
    expert_bytes: int                 # bytes of one expert of one layer, all its tensors
    expert_matrix_bytes: int          # ... of its weight matrices only: what one slot holds
    expert_tensor_bytes: int          # bytes of every routed-expert tensor of the model

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_blocks)

    def blk_to_moe(self) -> np.ndarray:
        """int32 [n_blocks]: the MoE-layer index of each block, -1 for blocks without experts."""
        table = np.full(self.n_blocks, -1, dtype=np.int32)
        for moe_index, blk in enumerate(self.moe_blocks):
            table[blk] = moe_index
        return table

    def expert_pattern(self) -> str:
        """Regex for tensor_buft_overrides matching the routed-expert tensors of these MoE layers."""
        return r"^blk\.(" + "|".join(map(str, self.moe_blocks)) + r")" + EXPERT_TENSOR_PATTERN

    def without_last(self, n_layers: int) -> "MoELayout":
        """This layout less its last `n_layers` MoE layers (those whose experts stay on the GPU)."""
        if not 0 <= n_layers < self.n_moe_layers:
            raise ValueError(
                f"resident_layers={n_layers} is outside 0..{self.n_moe_layers - 1} for the {self.n_moe_layers} "
                f"MoE layers of {self.path}: all of them resident leaves nothing to manage (use llama_cpp.Llama, "
                "or hot_experts=None, for that)."
            )
        kept = self.moe_blocks[: self.n_moe_layers - n_layers]
        return replace(self, moe_blocks=kept,
                       expert_tensor_bytes=self.expert_tensor_bytes * len(kept) // self.n_moe_layers)

    def slot_bytes(self, hot_experts: int) -> int:
        """Memory needed for `hot_experts` slots in every MoE layer."""
        return hot_experts * self.expert_bytes * self.n_moe_layers


def _field_value(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        return None
    return field.contents()


def read_moe_layout(path: str | Path) -> MoELayout:
    """Read the MoE layout of a GGUF file; ValueError if it is not a GGUF MoE model."""
    from gguf import GGUFReader  # imported here: parsing is only needed when hot_experts is set

    path = str(path)
    if not Path(path).is_file():
        raise ValueError(f"Model file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct.error/... on foreign files
        raise ValueError(f"{path} is not a readable GGUF model ({exc}).") from exc

    arch = _field_value(reader, "general.architecture") or "unknown"
    n_blocks = int(_field_value(reader, f"{arch}.block_count") or 0)
    n_expert = int(_field_value(reader, f"{arch}.expert_count") or 0)
    n_expert_used = int(_field_value(reader, f"{arch}.expert_used_count") or 0)

    moe_blocks: set[int] = set()
    projections: list[str] = []
    per_layer_bytes: dict[int, int] = {}
    per_layer_matrix_bytes: dict[int, int] = {}
    total = 0
    for tensor in reader.tensors:
        if not _EXPERT_ANY.search(tensor.name):
            continue
        blk = int(tensor.name.split(".")[1])
        per_layer_bytes[blk] = per_layer_bytes.get(blk, 0) + int(tensor.n_bytes)
        total += int(tensor.n_bytes)
        match = _EXPERT_WEIGHT.match(tensor.name)
        if match:
            per_layer_matrix_bytes[blk] = per_layer_matrix_bytes.get(blk, 0) + int(tensor.n_bytes)
            moe_blocks.add(blk)
            if match.group(2) not in projections:
                projections.append(match.group(2))

    if not moe_blocks or n_expert <= 0:
        raise ValueError(
            f"{Path(path).name} (architecture '{arch}') is not a Mixture-of-Experts model: it has no "
            "routed-expert tensors (ffn_*_exps), so there are no experts to keep hot. "
            "Use llama_cpp.Llama for dense models, or leave hot_experts=None."
        )
    order = {"gate": 0, "up": 1, "gate_up": 2, "down": 3}
    first = min(moe_blocks)
    return MoELayout(
        path=path,
        arch=arch,
        n_blocks=n_blocks or (max(moe_blocks) + 1),
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        moe_blocks=tuple(sorted(moe_blocks)),
        projections=tuple(sorted(projections, key=order.__getitem__)),
        expert_bytes=per_layer_bytes[first] // n_expert,
        expert_matrix_bytes=per_layer_matrix_bytes[first] // n_expert,
        expert_tensor_bytes=total,
    )
