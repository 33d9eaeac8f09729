"""The example scripts run as a user would run them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd="/")


def test_chat_streams_and_shows_the_stats_footer(text_model):
    result = run_example("chat.py", text_model, "--hot-experts", "4", "--max-tokens", "8",
                         stdin="Hello there\nAnd again\n\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2
    assert result.stdout.count("[hit rate ") == 2 and "slots | decode" in result.stdout


def test_bench_compares_stock_and_llamahot(text_model):
    result = run_example("bench.py", text_model, "--hot-experts", "2,8", "--tokens", "8", "--reps", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["mode", "decode", "tok/s"]
    assert any(line.startswith("stock (experts in RAM)") for line in lines)
    assert any(line.startswith("llamahot K=8") for line in lines)


def test_openai_client_says_what_to_do_without_a_server():
    result = run_example("openai_client.py", "hi", "--url", "http://127.0.0.1:9/v1")
    assert result.returncode == 1 and "llamahot serve" in result.stderr
