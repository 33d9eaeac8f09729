"""The shared-memory snapshot another process reads by pid (what the TUI will show)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

import llamahot
from llamahot import monitor
from llamahot.hot_cache import SNAPSHOT_PERIOD_S

from conftest import LLAMA_KW

READER = textwrap.dedent("""
    import json, sys
    from llamahot.monitor import read_snapshots
    out = []
    for s in read_snapshots(int(sys.argv[1])):
        out.append({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in s.items()})
    print(json.dumps(out))
""")


def read_from_another_process(pid: int) -> list[dict]:
    result = subprocess.run([sys.executable, "-c", READER, str(pid)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_snapshot_is_readable_by_pid_from_another_process(text_model):
    llm = llamahot.Llama(text_model, hot_experts=3, rebalance_interval=8, **LLAMA_KW)
    llm.eval(llm.tokenize(b"def f(x):\n"))
    for token in range(10, 30):
        llm.eval([token])
    llm.hot_cache._publish_snapshot()  # the periodic refresh may not have come due in a fast test
    stats = llm.hot_cache.stats()

    snapshots = read_from_another_process(os.getpid())
    mine = [s for s in snapshots if s["name"] == llm.hot_cache.snapshot_name]
    assert len(mine) == 1
    snap = mine[0]
    assert snap["pid"] == os.getpid() and snap["model"] == os.path.basename(text_model)
    assert snap["hot_experts"] == 3 and snap["n_moe_layers"] == stats["n_moe_layers"]
    for key in ("tokens", "hits", "misses", "decode_tokens", "bytes_moved", "rebalances", "slots_occupied",
                "slot_bytes"):
        assert snap[key] == stats[key], key
    assert snap["hit_rate"] == stats["hit_rate"]
    assert snap["hits_per_layer"] == stats["hits_per_layer"].tolist()
    assert snap["expert_of_slot"] == llm.hot_cache.hot_sets().tolist()
    assert snap["routing_counts"] == llm.hot_cache.routing_counts().tolist()
    # The reader did not take the block with it when it exited.
    assert monitor.read_snapshot(llm.hot_cache.snapshot_name) is not None

    name = llm.hot_cache.snapshot_name
    llm.close()
    assert monitor.read_snapshot(name) is None, "closing the Llama removes its snapshot"


def test_snapshot_refreshes_while_decoding(text_model):
    import time
    llm = llamahot.Llama(text_model, hot_experts=2, **LLAMA_KW)
    llm.eval(llm.tokenize(b"x = "))
    first = monitor.read_snapshot(llm.hot_cache.snapshot_name)
    time.sleep(SNAPSHOT_PERIOD_S * 1.5)
    for token in range(40, 44):
        llm.eval([token])
    later = monitor.read_snapshot(llm.hot_cache.snapshot_name)
    assert later["tokens"] > first["tokens"] and later["time"] > first["time"]


def test_torn_writes_are_never_read():
    writer = monitor.SnapshotWriter.create(os.getpid(), 2, 8, 2, "unit")
    try:
        arrays = dict(hits_per_layer=np.array([1, 2]), misses_per_layer=np.array([3, 4]),
                      expert_of_slot=np.array([[0, 1], [2, -1]]))
        writer.write(tokens=5, hits=3, misses=7, **arrays)
        snap = monitor.read_snapshot(writer.name)
        assert snap["tokens"] == 5 and snap["hit_rate"] == 0.3 and snap["slots_occupied"] == 3
        writer._record["seq"] += 1  # a write in progress (odd sequence)
        assert monitor.read_snapshot(writer.name, retries=3) is None
        writer._record["seq"] += 1
        assert monitor.read_snapshot(writer.name)["misses"] == 7
    finally:
        writer.close()
    assert monitor.read_snapshots(os.getpid()) == [] or all(s["name"] != writer.name
                                                             for s in monitor.read_snapshots(os.getpid()))
