#!/bin/bash
# gpu_mode="managed" with a model larger than the free VRAM (benchmarks/gpu/oversub_probe.py), in one device
# call: setup, the 30B-shaped routed model, a routing profile from the second half of the held-out text,
# then the probe with a VRAM blocker.
#
#   bash benchmarks/gpu/oversub.sh OUT_DIR [oversub_probe.py arguments, e.g. --free-gib 10 --k 51]
set -o pipefail
out=${1:?usage: bash benchmarks/gpu/oversub.sh OUT_DIR [probe arguments]}
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
text=benchmarks/data/heldout_code.txt
# The profile: the text's second half (the probe decodes windows from its start).
python3 -c "import sys; d = open('$text', 'rb').read(); sys.stdout.buffer.write(d[len(d) // 2:])" > /tmp/profile_text.txt
rm -f "$out/profile.npz"
python3 -m llamahot profile "$model" /tmp/profile_text.txt "$out/profile.npz" --slot-device cuda --max-tokens 20000 2>&1 \
    | grep -v "^llama_\|^ggml_cuda_init\|Device 0"
cp "$out/profile.npz" /tmp/profile.npz   # the probe's instances add to their copy when they close
echo "oversub: ready after $(( $(date +%s) - start )) s"
python3 benchmarks/gpu/oversub_probe.py "$model" --out "$out" --text "$text" --profile /tmp/profile.npz "${@:2}" 2>&1 \
    | grep -v "^llama_kv_cache\|^llama_context" | tee "$out/oversub.log"
echo "oversub: done after $(( $(date +%s) - start )) s"
