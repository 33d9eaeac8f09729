#!/bin/bash
# Prepare a bare, offline GPU machine to run llamahot from this checkout: wheels, llama-cpp-python
# 0.3.36 with CUDA, the shim compiled in place.
#
#   bash benchmarks/gpu/setup.sh OUT_DIR && export PYTHONPATH=/tmp/site:$PWD    (from the repository root)
#
# Carried folders (named in the device call's `carry`):
#   .whl/                       cffi, pycparser, diskcache, gguf wheels for Python 3.12
#   carry/llama-cuda/*.part-*   a llama_cpp package built here before (tar.xz in parts): reused, no build; else
#   carry/sdist/*-trim.tar.gz   the trimmed sdist (../shared/tools/trim-llama-sdist.sh), built here
#                               for sm_90 (~3.5 min on 16 cores); the package then goes to
#                               OUT_DIR/llama-cuda/ in 15 MiB parts (~41 MiB), to carry next time.
set -eo pipefail
out_dir=${1:?usage: bash benchmarks/gpu/setup.sh OUT_DIR}
SITE=/tmp/site
mkdir -p "$SITE" "$out_dir"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH=$SITE
have_llama() { (cd /tmp && python3 -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload()") 2>/dev/null; }
# xz, not gzip: the build is 41 MB instead of 44, which leaves room in a device call's 64 MiB.
unxz() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)"; }
if ls carry/llama-cuda/llama_cpp-cuda.tar.xz.part-* >/dev/null 2>&1; then
    cat carry/llama-cuda/llama_cpp-cuda.tar.xz.part-* | unxz | tar xf - -C "$SITE"
    have_llama && echo "setup: reusing the carried CUDA build of llama_cpp"
fi
if ! have_llama; then
    echo "setup: building llama-cpp-python 0.3.36 with CUDA for sm_90"
    start=$(date +%s)
    tar xzf carry/sdist/llama_cpp_python-0.3.36-trim.tar.gz -C /tmp
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=16 \
        python3 -m pip install -q --no-build-isolation --no-deps --no-cache-dir --upgrade --target "$SITE" \
        /tmp/llama_cpp_python-0.3.36
    echo "setup: llama-cpp-python built in $(( $(date +%s) - start )) s"
    # pip copies the libraries' version symlinks as files: link them again (3x smaller to carry).
    (cd "$SITE/llama_cpp/lib" && for f in *.so.*; do
        real=$(ls "${f%%.so*}".so.* | awk '{ print length, $0 }' | sort -n | tail -1 | cut -d' ' -f2)
        [ "$f" != "$real" ] && cmp -s "$f" "$real" && ln -sf "$real" "$f"; done
     for f in *.so; do real=$(ls "$f".* 2>/dev/null | awk '{ print length, $0 }' | sort -n | tail -1 | cut -d' ' -f2)
        [ -n "$real" ] && cmp -s "$f" "$real" && ln -sf "$real" "$f"; done; true)
    find "$SITE/llama_cpp" -name __pycache__ -prune -exec rm -rf {} +
    mkdir -p "$out_dir/llama-cuda"
    (cd "$SITE" && tar cf - llama_cpp) | python3 -c "import lzma, shutil, sys
with lzma.open(sys.stdout.buffer, 'w', preset=6) as out: shutil.copyfileobj(sys.stdin.buffer, out)" | split -b 15M - "$out_dir/llama-cuda/llama_cpp-cuda.tar.xz.part-"
fi
# llamahot's shim, compiled in place next to its sources.
python3 setup.py -q build_ext --inplace > /tmp/llamahot-build.log 2>&1 || { cat /tmp/llamahot-build.log; exit 1; }
PYTHONPATH=$SITE:$PWD python3 -c "import llama_cpp, llamahot; print('setup: llama_cpp', llama_cpp.__version__, '+ llamahot', llamahot.__version__, 'ready')"
