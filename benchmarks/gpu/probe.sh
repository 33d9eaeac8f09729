#!/bin/bash
# One device call for a probe script on the 30B-shaped routed model: setup, the model, then the probe.
#
#   bash benchmarks/gpu/probe.sh OUT_DIR benchmarks/gpu/move_probe.py [probe arguments]
# (the probe gets MODEL --out OUT_DIR --text benchmarks/data/heldout_code.txt before its own arguments)
set -o pipefail
out=${1:?usage: bash benchmarks/gpu/probe.sh OUT_DIR PROBE.py [arguments]}
probe=${2:?usage: bash benchmarks/gpu/probe.sh OUT_DIR PROBE.py [arguments]}
mkdir -p "$out"
source benchmarks/gpu/routed_setup.sh
echo "probe: ready after $(( $(date +%s) - start )) s"
python3 "$probe" "$model" --out "$out" --text benchmarks/data/heldout_code.txt "${@:3}" 2>&1 \
    | grep -v "^llama_kv_cache\|^llama_context" | tee "$out/$(basename "$probe" .py).log"
echo "probe: done after $(( $(date +%s) - start )) s"
