"""Pieces of the GPU suite (benchmarks/gpu/bench.py) that can be checked without a GPU."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

from llamahot.model_info import EXPERT_TENSOR_PATTERN, read_moe_layout

from conftest import LLAMA_KW

spec = importlib.util.spec_from_file_location("gpu_bench", Path(__file__).parents[1] / "benchmarks/gpu/bench.py")
gpu_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_bench)


def test_static_offload_pattern_takes_the_first_blocks(all_moe_models):
    layout = read_moe_layout(all_moe_models["deepseek2-tiny"])  # its first block is dense
    pattern = gpu_bench.static_cpu_pattern(2, layout)
    names = [f"blk.{b}.ffn_{p}_exps.weight" for b in range(layout.n_blocks) for p in ("gate_up", "down")]
    on_cpu = {n for n in names if re.search(pattern, n)}
    assert on_cpu == {n for n in names if int(n.split(".")[1]) in layout.moe_blocks[:2]}
    assert gpu_bench.static_cpu_pattern(0, layout) is None


def test_stock_placed_places_matching_tensors_in_host_memory(all_moe_models, capfd):
    path = all_moe_models["qwen3moe-tiny"]
    layout = read_moe_layout(path)
    pattern = gpu_bench.static_cpu_pattern(1, layout)
    llm = gpu_bench.StockPlaced(path, cpu_pattern=pattern, **{**LLAMA_KW, "verbose": True})
    log = capfd.readouterr().err
    overridden = {line.split()[1] for line in log.splitlines()
                  if line.startswith("tensor ") and "buffer type overridden to CPU" in line}
    first = layout.moe_blocks[0]
    assert overridden and all(name.startswith(f"blk.{first}.") and re.search(EXPERT_TENSOR_PATTERN, name)
                              for name in overridden)
    # It is stock llama_cpp: no callback, same logits as llama_cpp.Llama on a CPU build.
    assert not llm.context_params.cb_eval
    tokens, logits = gpu_bench.greedy_run(llm, 4)
    assert len(tokens) == 4 and np.isfinite(logits).all()
    llm.close()
