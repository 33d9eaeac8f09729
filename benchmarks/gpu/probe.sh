#!/bin/bash
# One device call for a probe script on the 30B-shaped routed model: setup, the model, then the probe.
#
#   bash benchmarks/gpu/probe.sh OUT_DIR benchmarks/gpu/move_probe.py [probe arguments]
# (the probe gets MODEL --out OUT_DIR --text benchmarks/data/heldout_code.txt before its own arguments)
set -o pipefail
out=${1:?usage: bash benchmarks/gpu/probe.sh OUT_DIR PROBE.py [arguments]}
probe=${2:?usage: bash benchmarks/gpu/probe.sh OUT_DIR PROBE.py [arguments]}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)
bash benchmarks/gpu/setup.sh "$out" > /tmp/setup.log 2>&1 || { tail -40 /tmp/setup.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2; } \
    | tee "$out/machine.txt"
model=/tmp/models/qwen3moe-30b-a3b-routed.gguf
mkdir -p /tmp/models
[ -f "$model" ] || python3 -m llamahot.synth qwen3moe-30b-a3b-routed "$model" > /tmp/synth.log 2>&1 || { tail /tmp/synth.log; exit 1; }
echo "probe: ready after $(( $(date +%s) - start )) s"
python3 "$probe" "$model" --out "$out" --text benchmarks/data/heldout_code.txt "${@:3}" 2>&1 \
    | grep -v "^llama_kv_cache\|^llama_context" | tee "$out/$(basename "$probe" .py).log"
echo "probe: done after $(( $(date +%s) - start )) s"
