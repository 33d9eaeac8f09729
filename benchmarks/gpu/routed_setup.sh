# Sourced by the one-call probe scripts (probe.sh, oversub.sh) with $out set: set up the machine
# (setup.sh), record it in $out/machine.txt, synthesize the 30B-shaped routed model into $model.
export PYTHONUNBUFFERED=1
start=$(date +%s)
bash benchmarks/gpu/setup.sh "$out" > /tmp/setup.log 2>&1 || { tail -40 /tmp/setup.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2; } \
    | tee "$out/machine.txt"
model=/tmp/models/qwen3moe-30b-a3b-routed.gguf
mkdir -p /tmp/models
[ -f "$model" ] || python3 -m llamahot.synth qwen3moe-30b-a3b-routed "$model" > /tmp/synth.log 2>&1 || { tail /tmp/synth.log; exit 1; }
