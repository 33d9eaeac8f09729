#!/bin/bash
# Plain Q4_K vec_dot against CPU_REPACK gemv, warm and cold, 1 and many threads (kernel_cost.c), on the
# device (~1 min after setup):   bash benchmarks/gpu/kernel_cost.sh OUT_DIR
set -o pipefail
out=${1:?usage: bash benchmarks/gpu/kernel_cost.sh OUT_DIR}
mkdir -p "$out"
bash benchmarks/gpu/setup.sh "$out" > /tmp/setup.log 2>&1 || { tail -40 /tmp/setup.log; exit 1; }
lscpu | grep -E "^(Model name|Thread|Core|Socket|CPU\(s\)|L3|NUMA node)" | tee "$out/lscpu.txt"
lib=/tmp/site/llama_cpp/lib
gcc -O2 -std=c11 -Icsrc/vendor/include benchmarks/gpu/kernel_cost.c -L$lib -lggml-base -lggml-cpu -lggml \
    -Wl,-rpath,$lib -lm -o /tmp/kernel_cost || exit 1
PYTHONPATH=/tmp/site python3 -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())" 2>/dev/null | tee -a "$out/kernel_cost.txt"
# rows,copies,reps,threads: one expert's gate warm and cold on one thread; 8 experts' gates on 1, 8, 16.
for args in ${KERNEL_COST_ARGS:-768,1,3000,1 768,600,3000,1 6144,1,1000,1 6144,80,1000,1 6144,1,2000,8 6144,80,2000,8 6144,1,2000,16 6144,80,2000,16}; do
    /tmp/kernel_cost ${args//,/ } 2>&1 | grep -v "^ggml_\|^load_backend\|^repack:" | tee -a "$out/kernel_cost.txt"
done
