#!/bin/bash
# The CPU side of a stop on the device, ~1 min after setup:
#   bash benchmarks/gpu/graph_cost.sh OUT_DIR          the fixed cost of a stop's CPU graph, split (graph_cost.c)
#   bash benchmarks/gpu/graph_cost.sh OUT_DIR kernel   plain Q4_K vec_dot against CPU_REPACK gemv, warm and
#                                                      cold, 1 to 16 threads (kernel_cost.c)
set -o pipefail
out=${1:?usage: bash benchmarks/gpu/graph_cost.sh OUT_DIR [kernel]}
probe=${2:-graph}
mkdir -p "$out"
bash benchmarks/gpu/setup.sh "$out" > /tmp/setup.log 2>&1 || { tail -40 /tmp/setup.log; exit 1; }
lscpu | grep -E "^(Model name|Thread|Core|Socket|CPU\(s\)|L3|NUMA node)" | tee "$out/lscpu.txt"
lib=/tmp/site/llama_cpp/lib
gcc -O2 -std=c11 -Icsrc/vendor/include benchmarks/gpu/${probe}_cost.c -L$lib -lggml-base -lggml-cpu -lggml \
    -Wl,-rpath,$lib -lm -lpthread -o /tmp/${probe}_cost || exit 1
log="$out/${probe}_cost.txt"
cat /sys/kernel/mm/transparent_hugepage/enabled | tee -a "$log"
grep -o 'avx512[a-z_]*\|avx2\|amx[a-z_]*' /proc/cpuinfo | sort -u | tr '\n' ' ' | tee -a "$log"; echo
PYTHONPATH=/tmp/site python3 -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())" 2>/dev/null | tee -a "$log"
if [ "$probe" = kernel ]; then
    # rows,copies,reps,threads: one expert's gate warm and cold on one thread; 8 experts' gates on 1, 8, 16.
    runs=${KERNEL_COST_ARGS:-768,1,3000,1 768,600,3000,1 6144,1,1000,1 6144,80,1000,1 6144,1,2000,8 6144,80,2000,8 6144,1,2000,16 6144,80,2000,16}
else
    # threads,reps,gap_us[,pages[,warm|cold[,prefetch_bytes]]] (graph_cost.c)
    runs=${GRAPH_COST_ARGS:-16,2000,200 16,2000,0 8,2000,200 16,2000,200}
fi
for args in $runs; do
    /tmp/${probe}_cost ${args//,/ } 2>&1 | grep -v "^ggml_\|^load_backend\|^repack:" | tee -a "$log"
done
