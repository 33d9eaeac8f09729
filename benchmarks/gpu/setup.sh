#!/bin/bash
# Prepare a bare, offline GPU machine to run llamahot: wheels, llama-cpp-python 0.3.36 with CUDA, llamahot.
#
#   source benchmarks/gpu/setup.sh OUT_DIR        (from the repository root)
#
# Carried folders (see benchmarks/gpu/README.md):
#   .whl/                       cffi, pycparser, diskcache, gguf wheels for Python 3.12
#   carry/llama-cuda/*.part-*   a llama_cpp package built here before (reused: no build), else
#   carry/sdist/*-trim.tar.gz   the trimmed sdist (../shared/tools/trim-llama-sdist.sh), built here
#                               for sm_90 (~4.5 min on 16 cores); the package then goes to
#                               OUT_DIR/llama-cuda/ in 15 MiB parts, to be carried next time.
set -eo pipefail
out_dir=${1:?usage: source benchmarks/gpu/setup.sh OUT_DIR}
SITE=/tmp/site
mkdir -p "$SITE" "$out_dir"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH=$SITE
if ls carry/llama-cuda/llama_cpp-cuda.tar.gz.part-* >/dev/null 2>&1; then
    echo "setup: reusing the carried CUDA build of llama_cpp"
    cat carry/llama-cuda/llama_cpp-cuda.tar.gz.part-* | tar xzf - -C "$SITE"
else
    echo "setup: building llama-cpp-python 0.3.36 with CUDA for sm_90"
    start=$(date +%s)
    tar xzf carry/sdist/llama_cpp_python-0.3.36-trim.tar.gz -C /tmp
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=16 \
        python3 -m pip install -q --no-build-isolation --no-deps --no-cache-dir --target "$SITE" /tmp/llama_cpp_python-0.3.36
    echo "setup: llama-cpp-python built in $(( $(date +%s) - start )) s"
    mkdir -p "$out_dir/llama-cuda"
    (cd "$SITE" && tar czf - llama_cpp) | split -b 15M - "$out_dir/llama-cuda/llama_cpp-cuda.tar.gz.part-"
fi
# llamahot itself (compiles the shim against the vendored headers).
python3 -m pip install -q --no-build-isolation --no-deps --no-cache-dir --target "$SITE" .
cd /tmp && python3 -c "import llama_cpp, llamahot; print('setup: llama_cpp', llama_cpp.__version__, 'gpu offload', llama_cpp.llama_supports_gpu_offload())" && cd - >/dev/null
