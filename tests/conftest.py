"""Shared fixtures: the project's synthetic test models (generated once per test session) and its trained model."""
from __future__ import annotations

from pathlib import Path

import llama_cpp.llama_cpp
import pytest

from llamahot.synth import synth_model

# Every stock llama of the tests without llama.cpp's extra CPU buffer types (weight repacking, AMX), as
# llamahot.Llama and llamahot.benchmark.StockPlaced load theirs: both sides of every comparison use the
# same weight layout. On a CPU with AMX, llama-cpp-python 0.3.36 itself crashes with them on (stock, no
# llamahot involved): a segfault in ggml_backend_amx_mul_mat decoding the trained Q8_0 model, and an abort
# at a deepseek2 model's first context (GGML_ASSERT(*cur_backend_id != -1) in ggml_backend_sched_split_graph).
_default_model_params = llama_cpp.llama_cpp.llama_model_default_params


def _model_params_without_extra_bufts():
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


llama_cpp.llama_cpp.llama_model_default_params = _model_params_without_extra_bufts

# The synthetic presets, plus the embedded model the project trained (models/, real routing).
TRAINED_MODEL = "llamahot-code-moe"
MOE_PRESETS = ("qwen3moe-tiny", "deepseek2-tiny", "gptoss-tiny", "qwen3moe-mini", TRAINED_MODEL)
TEXT_PRESET = "qwen3moe-tiny"
DENSE_PRESET = "dense-tiny"

# Small and deterministic: every llama in the tests uses the same runtime settings.
LLAMA_KW = dict(n_ctx=512, n_batch=512, n_threads=2, n_threads_batch=2, seed=0, verbose=False)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _model(model_dir: Path, preset: str) -> str:
    if preset == TRAINED_MODEL:
        return str(Path(__file__).parents[1] / "models" / f"{TRAINED_MODEL}.gguf")
    path = model_dir / f"{preset}.gguf"
    if not path.exists():
        synth_model(path, preset, seed=0)
    return str(path)


@pytest.fixture(scope="session", params=MOE_PRESETS)
def moe_model(request, model_dir) -> str:
    return _model(model_dir, request.param)


@pytest.fixture(scope="session")
def text_model(model_dir) -> str:
    return _model(model_dir, TEXT_PRESET)


@pytest.fixture(scope="session")
def dense_model(model_dir) -> str:
    return _model(model_dir, DENSE_PRESET)


@pytest.fixture(scope="session")
def all_moe_models(model_dir) -> dict[str, str]:
    return {preset: _model(model_dir, preset) for preset in MOE_PRESETS}


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where llama-cpp-python was built with a GPU backend."""
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return
    skip = pytest.mark.skip(reason="needs a CUDA build of llama-cpp-python and a GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_one_input_copy_per_persistent_run(stats: dict) -> None:
    """A persistent hot graph's inputs (rows, slot ids, expert ids) lie together on the device and go up
    in one copy; a graph built for the call takes one copy per input (two, or three with biases)."""
    built = stats["gpu_runs"] - stats["persistent_gpu_runs"]
    assert stats["persistent_gpu_runs"] + 2 * built <= stats["gpu_input_copies"] <= \
        stats["persistent_gpu_runs"] + 3 * built
