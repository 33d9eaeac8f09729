#!/bin/bash
# Which import order makes loading a model crash in llama_model::print_info (seen under pytest)?
m=models/llamahot-code-moe.gguf
load='llama_cpp.Llama("'$m'", n_gpu_layers=-1, verbose=False); print("loaded")'
for order in "import llama_cpp" "import llamahot.synth; import llama_cpp" "import gguf; import llama_cpp" \
             "import pytest; import llama_cpp" "import llama_cpp; import llamahot.synth; import llamahot"; do
    echo "=== $order"
    timeout 60 python3 -c "$order; import llama_cpp; $load" 2>&1 | grep -v "^ggml_cuda_init\|Device 0" | tail -2
done
