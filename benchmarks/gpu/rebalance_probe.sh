#!/bin/bash
# Rebalance and cold-compute probes on the routed 30B-shaped model, in one device call (~4 min):
#   bash benchmarks/gpu/rebalance_probe.sh OUT_DIR [variant lines file] [probe script]
# Each variant line: "ENV=... -- probe arguments" (one process, so one model load, each). The probe is
# rebalance_probe.py unless named (threads_probe.py: stock rows and llamahot side by side).
# GPU_TESTS=1: run tests/test_gpu.py first.
set -o pipefail
out=${1:?usage: bash benchmarks/gpu/rebalance_probe.sh OUT_DIR [VARIANTS_FILE] [PROBE_SCRIPT]}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bash benchmarks/gpu/setup.sh "$out" > /tmp/setup.log 2>&1 || { tail -40 /tmp/setup.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
if [ -n "$GPU_TESTS" ]; then   # the GPU tests first (greedy tokens identical to stock), as run.sh does
    PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
        | tee "$out/pytest_gpu.log" | tail -5
fi
lscpu | grep -E "^(Model name|Thread|Core|Socket|CPU\(s\)|L3|NUMA node)" | tee "$out/lscpu.txt"
preset=${PRESET:-qwen3moe-30b-a3b-routed}   # PRESET=qwen3moe-30b-a3b: the uniform model of issue #4
model=/tmp/models/$preset.gguf
mkdir -p /tmp/models
[ -f "$model" ] || python3 -m llamahot.synth "$preset" "$model" > /tmp/synth.log 2>&1 || { tail /tmp/synth.log; exit 1; }
variants=${2:-benchmarks/gpu/rebalance_variants.txt}
probe=${3:-benchmarks/gpu/rebalance_probe.py}
while IFS= read -r line; do
    [ -z "$line" ] || [ "${line:0:1}" = "#" ] && continue
    envs=${line%%--*}; probe_args=${line#*--}
    env $envs python3 "$probe" "$model" $probe_args 2>&1 | tee -a "$out/probe_raw.txt" \
        | grep -v "^llama_\|^ggml_cuda_init\|Device 0\|^load\|^print_info" | tee -a "$out/probe.txt"; echo "rc ${PIPESTATUS[0]}: $line"
done < "$variants"
