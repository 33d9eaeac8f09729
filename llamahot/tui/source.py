"""Where the monitor's pictures come from: the shared-memory snapshots of llamahot processes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from llamahot import monitor


class SnapshotSource:
    """Reads one cache's block; `read()` is None once the block (or its process) is gone."""

    def __init__(self, name: str):
        self.name = name

    def read(self) -> Optional[dict]:
        return monitor.read_snapshot(self.name)


@dataclass
class Rates:
    """What changed between two pictures: the live numbers a monitor shows."""

    decode_tok_s: float = 0.0
    hit_rate: float = 0.0
    layer_hit_rate: Optional[np.ndarray] = None
    hotness: Optional[np.ndarray] = None      # [n_layers, n_expert], routing per second, smoothed


def rates(previous: Optional[dict], current: dict, hotness: Optional[np.ndarray], smoothing: float = 0.5) -> Rates:
    """Rates between two snapshots of the same cache (cumulative counters, so differences)."""
    out = Rates()
    if previous is None or previous.get("name") != current.get("name"):
        out.hit_rate = current["hit_rate"]
        total = current["hits_per_layer"] + current["misses_per_layer"]
        out.layer_hit_rate = np.divide(current["hits_per_layer"], total, out=np.zeros(total.shape), where=total > 0)
        out.hotness = np.zeros(current["routing_counts"].shape)
        out.decode_tok_s = current["decode_tok_s"]
        return out
    dt = current["decode_seconds"] - previous["decode_seconds"]
    dn = current["decode_tokens"] - previous["decode_tokens"]
    out.decode_tok_s = dn / dt if dt > 0 else 0.0
    hits = current["hits_per_layer"] - previous["hits_per_layer"]
    misses = current["misses_per_layer"] - previous["misses_per_layer"]
    total = hits + misses
    # No new routing since the last picture (paused, or prefill only): the cumulative rate.
    out.hit_rate = hits.sum() / total.sum() if total.sum() > 0 else current["hit_rate"]
    out.layer_hit_rate = np.divide(hits, total, out=np.zeros(total.shape), where=total > 0)
    wall = max(current["time"] - previous["time"], 1e-6)
    routed = (current["routing_counts"] - previous["routing_counts"]) / wall
    out.hotness = routed if hotness is None or hotness.shape != routed.shape else \
        smoothing * hotness + (1 - smoothing) * routed
    return out
