#!/bin/bash
# Two open questions of issue #4, in one short device call (after setup.sh):
# 1. why tests/test_gpu.py crashes in llama_model::print_info under pytest (not in bench.py): run it
#    plain, without output capture (-s) and without faulthandler;
# 2. why an installed eval callback costs the CUDA backend its graphs: llama.cpp's debug log of the
#    CUDA graph logic, all on the GPU, with and without an idle callback (graphs_probe.py --why).
#   bash benchmarks/gpu/diagnose.sh OUT_DIR
out=${1:?usage: bash benchmarks/gpu/diagnose.sh OUT_DIR}
mkdir -p "$out"
bash benchmarks/gpu/setup.sh "$out" > "$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
for opts in "" "-s" "-p no:faulthandler"; do
    echo "=== pytest $opts"
    timeout 70 python3 -m pytest -x -q -p no:cacheprovider $opts tests/test_gpu.py > "$out/pytest.log" 2>&1
    echo "rc=$?"; grep -m3 "passed\|failed\|Segmentation\|Error" "$out/pytest.log"
done
mkdir -p /tmp/models
python3 -m llamahot.synth qwen3moe-mini /tmp/models/mini.gguf > /dev/null 2>&1
python3 benchmarks/gpu/graphs_probe.py /tmp/models/mini.gguf /dev/null --why > "$out/why.log" 2>&1
python3 - "$out/why.log" <<'PY'
import collections, re, sys
section, counts = None, collections.defaultdict(collections.Counter)
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("=== "):
        section = line.strip()
    elif re.search(r"CUDA [Gg]raph|warmup|graph_compute|disabling", line):
        counts[section][re.sub(r"0x[0-9a-f]+|\d+", "#", line.strip())[:140]] += 1
for section, c in counts.items():
    print(section)
    for text, n in c.most_common(8):
        print(f"  {n:5d}x {text}")
PY
python3 benchmarks/gpu/graphs_probe.py /tmp/models/mini.gguf "$out/probe_mini.json" --tokens 32 --reps 3 2>&1 | grep -v "^llama_\|^ggml_cuda_init\|Device 0"
