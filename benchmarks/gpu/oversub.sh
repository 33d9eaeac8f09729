#!/bin/bash
# gpu_mode="managed" with a model larger than the free VRAM (benchmarks/gpu/oversub_probe.py), in one device
# call: setup, the 30B-shaped routed model, a routing profile from the second half of the held-out text,
# then the probe with a VRAM blocker.
#
#   bash benchmarks/gpu/oversub.sh OUT_DIR [oversub_probe.py arguments, e.g. --free-gib 10 --k 51]
set -o pipefail
out=${1:?usage: bash benchmarks/gpu/oversub.sh OUT_DIR [probe arguments]}
mkdir -p "$out"
source benchmarks/gpu/routed_setup.sh
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
