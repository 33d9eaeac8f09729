"""The `llamahot` command: demo, inspect, synth, and clear errors with a non-zero exit for bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest

from llamahot.__main__ import main
from llamahot.model_info import read_moe_layout


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamahot", *args], capture_output=True, text=True, cwd="/")


def test_inspect_reports_layout_and_slot_memory(text_model, capsys):
    layout = read_moe_layout(text_model)
    assert main(["inspect", text_model, "--vram-gib", "0.52"]) == 0
    out = capsys.readouterr().out
    assert f"{layout.n_moe_layers} MoE layers x {layout.n_expert} routed experts" in out
    assert f"K={layout.n_expert}" in out
    per_k = layout.expert_matrix_bytes * layout.n_moe_layers
    fits = min(layout.n_expert, int((0.52 * 2**30 - 512 * 2**20) // per_k))
    assert f"hot_experts={fits}" in out
    assert f"one resident layer (resident_layers, all its experts on the GPU): " \
           f"{layout.expert_tensor_bytes / layout.n_moe_layers / 2**30:.2f} GiB" in out


@pytest.mark.parametrize("bad", ["missing", "dense"])
def test_bad_models_exit_2_with_a_reason(bad, dense_model, tmp_path):
    path = str(tmp_path / "nope.gguf") if bad == "missing" else dense_model
    result = run_cli("inspect", path)
    assert result.returncode == 2
    expected = "Model file not found" if bad == "missing" else "not a Mixture-of-Experts model"
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_demo_runs_on_a_fixture(text_model):
    result = run_cli("demo", "--model", text_model, "--max-tokens", "6", "--hot-experts", "4")
    assert result.returncode == 0, result.stderr
    assert "hit rate" in result.stdout and "decode" in result.stdout


def test_demo_rejects_a_bad_k(text_model):
    result = run_cli("demo", "--model", text_model, "--hot-experts", "9999")
    assert result.returncode == 2 and "hot_experts=9999" in result.stderr


def test_synth_writes_a_model(tmp_path):
    out = tmp_path / "m.gguf"
    result = run_cli("synth", "dense-tiny", str(out))
    assert result.returncode == 0 and out.stat().st_size > 0
    assert run_cli("synth", "no-such-preset", str(out)).returncode == 2  # argparse: invalid choice


def test_bench_prints_the_side_by_side_table(text_model):
    result = run_cli("bench", text_model, "--hot-experts", "2,8", "--tokens", "4", "--reps", "1")
    assert result.returncode == 0, result.stderr
    assert "stock (experts in RAM)" in result.stdout and "llamahot K=8" in result.stdout
    bad = run_cli("bench", text_model, "--hot-experts", "999")
    assert bad.returncode == 2 and "hot_experts=999" in bad.stderr
