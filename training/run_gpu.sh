#!/bin/bash
# Train the embedded model on the lent GPU machine (offline), in one device call of under 10 minutes:
#
#   bash training/run_gpu.sh OUT_DIR [MINUTES]        (from the repository root; carry .whl/, carry/llama-cuda/,
#                                                      and carry/stdlib/ for the development box's corpus)
# Data: carry/stdlib/*.tar.xz if sent along (the development box's CPython 3.11 standard library, which the
# committed model was trained on; 4.4 MB), else that machine's own (Python 3.12: 3.6x smaller after the
# filter). Pack it on the development box with
#   python -c "import sys, tarfile, sysconfig; sys.path.insert(0, 'training'); import train_moe; from pathlib import Path
#   root = Path(sysconfig.get_paths()['stdlib']); t = tarfile.open('carry/stdlib/stdlib.tar.xz', 'w:xz')
#   [t.add(f, arcname=root.name + '/' + str(f.relative_to(root))) for f in train_moe.corpus_files(root)]; t.close()"
# Writes OUT_DIR/train/llamahot-code-moe.{gguf,json,pt}, and the committed model's held-out bits per byte
# to compare.
set -o pipefail
out=${1:?usage: bash training/run_gpu.sh OUT_DIR [MINUTES]}
minutes=${2:-7}
mkdir -p "$out/train"
export PYTHONUNBUFFERED=1
bash benchmarks/gpu/setup.sh "$out" > "$out/setup.log" 2>&1 || { tail -40 "$out/setup.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
data=()
if ls carry/stdlib/*.tar.xz > /dev/null 2>&1; then
    mkdir -p /tmp/stdlib && python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
        carry/stdlib/*.tar.xz /tmp/stdlib
    data=(--data "$(ls -d /tmp/stdlib/*/ | head -1)")
fi
python3 training/train_moe.py --device cuda --minutes "$minutes" --batch 64 "${data[@]}" \
    --out "$out/train/llamahot-code-moe.gguf" 2>&1 | grep -v '"step"' | tee "$out/train.log" | tail -20
echo "committed model: $(python3 training/check_gguf.py models/llamahot-code-moe.gguf 2>&1 | tail -1)" \
    | tee -a "$out/train.log"
