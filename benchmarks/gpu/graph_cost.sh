#!/bin/bash
# The fixed cost of a stop's CPU graph, split (graph_cost.c), on the device (~1 min after setup):
#   bash benchmarks/gpu/graph_cost.sh OUT_DIR
set -o pipefail
out=${1:?usage: bash benchmarks/gpu/graph_cost.sh OUT_DIR}
mkdir -p "$out"
bash benchmarks/gpu/setup.sh "$out" > /tmp/setup.log 2>&1 || { tail -40 /tmp/setup.log; exit 1; }
lscpu | grep -E "^(Model name|Thread|Core|Socket|CPU\(s\)|L3|NUMA node)" | tee "$out/lscpu.txt"
lib=/tmp/site/llama_cpp/lib
gcc -O2 -std=c11 -Icsrc/vendor/include benchmarks/gpu/graph_cost.c -L$lib -lggml-base -lggml-cpu \
    -Wl,-rpath,$lib -lm -lpthread -o /tmp/graph_cost || exit 1
cat /sys/kernel/mm/transparent_hugepage/enabled | tee -a "$out/graph_cost.txt"
grep -o 'avx512[a-z_]*\|avx2\|amx[a-z_]*' /proc/cpuinfo | sort -u | tr '\n' ' ' | tee -a "$out/graph_cost.txt"; echo
PYTHONPATH=/tmp/site python3 -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())" 2>/dev/null | tee -a "$out/graph_cost.txt"
# each run: threads,reps,gap_us[,pages[,warm|cold[,prefetch_bytes]]] (graph_cost.c)
for args in ${GRAPH_COST_ARGS:-16,2000,200 16,2000,0 8,2000,200 16,2000,200}; do
    /tmp/graph_cost ${args//,/ } 2>&1 | grep -v "^ggml_\|^load_backend" | tee -a "$out/graph_cost.txt"
done
