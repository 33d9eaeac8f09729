"""The OpenAI-compatible server (llama_cpp.server with llamahot.Llama) on loopback."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from llamahot import monitor
from llamahot.model_info import read_moe_layout

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_server_answers_a_chat_completion(text_model):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llamahot", "serve", text_model, "--hot-experts", "4",
                               "--resident-layers", "1", "--slot-device", "host", "--n-ctx", "512", "--port", str(port)],
                              cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2) as response:
                    models = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        else:
            pytest.fail("the server did not come up")
        assert models["data"][0]["id"] == text_model
        reply = post(f"{base}/chat/completions", {"messages": [{"role": "user", "content": "Write a function"}],
                                                  "max_tokens": 16, "temperature": 0})
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] > 0
        # The example client talks to it too.
        client = subprocess.run([sys.executable, "examples/openai_client.py", "Say hi", "--url", base,
                                 "--max-tokens", "8"], capture_output=True, text=True, timeout=120,
                                cwd=str(ROOT))
        assert client.returncode == 0 and "tokens, model" in client.stderr, client.stderr
        # The server's model is a llamahot.Llama: its cache is visible to a monitor by the server's pid.
        snapshots = monitor.read_snapshots(server.pid)
        assert len(snapshots) == 1 and snapshots[0]["hot_experts"] == 4 and snapshots[0]["tokens"] > 0
        # --resident-layers reached the model: llamahot manages all MoE layers but the last one.
        assert snapshots[0]["n_moe_layers"] == read_moe_layout(text_model).n_moe_layers - 1
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_rejects_a_dense_model(dense_model):
    result = subprocess.run([sys.executable, "-m", "llamahot", "serve", dense_model], cwd="/",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a Mixture-of-Experts model" in result.stderr


def test_serve_passes_cold_on_device_and_rejects_a_bad_share(text_model):
    from pydantic import ValidationError

    from llamahot.server import HotModelSettings, _llamahot_as_llama, server_model

    with pytest.raises(ValidationError):
        HotModelSettings(model=text_model, hot_experts=2, cold_on_device=1.5)
    settings = HotModelSettings(model=text_model, hot_experts=2, cold_on_device=0.25)
    with _llamahot_as_llama(settings):
        assert server_model.llama_cpp.Llama.keywords["cold_on_device"] == 0.25
    with _llamahot_as_llama(HotModelSettings(model=text_model, hot_experts=2)):   # llamahot's own default
        assert server_model.llama_cpp.Llama.keywords["cold_on_device"] is None
