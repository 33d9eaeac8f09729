#!/bin/bash
# The whole GPU suite of issue #4 in one run on a bare, offline H100 machine (benchmarks/gpu/README.md):
# set up, synthesize a model with Qwen3-30B-A3B's shapes, GPU tests, correctness and speed.
#
#   bash benchmarks/gpu/run.sh OUT_DIR [--quick | --routed] [more bench.py arguments, e.g. --ks 51]
# At most 8 files come back from a device call: logs of setup and synthesis stay in /tmp (their tails are
# printed on failure).
# --quick: the 4-layer mini model (a smoke test). --routed (issue #5's win): the 30B-shaped model with
# calibrated routing, decode teacher-forced over held-out code, K around 40 % residency.
set -o pipefail
out=${1:?usage: bash benchmarks/gpu/run.sh OUT_DIR [--quick]}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)
bash benchmarks/gpu/setup.sh "$out" > /tmp/setup.log 2>&1 || { tail -40 /tmp/setup.log; exit 1; }
tail -2 /tmp/setup.log
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2; } \
    | tee "$out/machine.txt"
if [ -n "$GDB_TEST" ]; then   # a C backtrace of a crashing test (cuda-gdb also debugs host code; no gdb there)
    timeout 100 cuda-gdb -q -batch -ex run -ex bt --args python3 -m pytest -x -q -p no:cacheprovider \
        $GDB_TEST > "$out/gdb.log" 2>&1
    grep -B2 -A25 "SIGSEGV" "$out/gdb.log" | cut -c1-200 | head -40
    tail -5 "$out/gdb.log"
elif [ -z "$NO_TESTS" ]; then   # NO_TESTS=1: the benchmark alone (tests/test_gpu.py ran in an earlier call)
    # Without plugin autoload: a pytest plugin of the machine's own Python environment made the first
    # model load crash in llama_model::print_info (CUDA build: static C++ runtimes; docs/NOTES.md).
    PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
        | tee "$out/pytest_gpu.log" | tail -5
fi
preset=qwen3moe-30b-a3b
bench_args=()
[ "$2" = "--quick" ] && preset=qwen3moe-mini
if [ "$2" = "--routed" ]; then
    preset=qwen3moe-30b-a3b-routed
    bench_args=(--text benchmarks/data/heldout_code.txt --ks 51,26,77 --check-ks "" --tokens 64 --skip-trained-check
               --policy-variants)
fi
model=/tmp/models/$preset.gguf
mkdir -p /tmp/models
[ -f "$model" ] || python3 -m llamahot.synth "$preset" "$model" > /tmp/synth.log 2>&1 || { tail /tmp/synth.log; exit 1; }
if [ -n "$PROBE" ]; then   # does an idle eval callback cost llama.cpp its CUDA graphs?
    python3 benchmarks/gpu/graphs_probe.py "$model" "$out/probe.json" --tokens 24 --reps 2 2>&1 | grep -v "^llama_\|^ggml_cuda_init\|Device 0"
    GGML_CUDA_DISABLE_GRAPHS=1 python3 benchmarks/gpu/graphs_probe.py "$model" "$out/probe_nographs.json" --tokens 24 --reps 2 2>&1 \
        | grep -v "^llama_\|^ggml_cuda_init\|Device 0"
fi
left=$(( 570 - ($(date +%s) - start) ))   # the device runs one command for at most 600 s
echo "run: setup, tests and model ready after $(( $(date +%s) - start )) s; ${left} s left for the benchmark"
timeout "$left" python3 benchmarks/gpu/bench.py "$model" --out "$out" --budget-s $(( left - 100 )) "${bench_args[@]}" "${@:3}" 2>&1 \
    | grep -v "^llama_kv_cache\|^llama_context" | tee "$out/bench.log"
echo "run: done after $(( $(date +%s) - start )) s"
