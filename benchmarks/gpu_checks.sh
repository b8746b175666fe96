#!/usr/bin/env bash
# The GPU checks of one short device session, in order of importance; each step has its own
# time limit so one hang cannot eat the rest. Run from the repository root on a CUDA machine:
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
# Logs (and a profiler trace) go to OUT_DIR (default gpu-checks/).
set -u
OUT=${1:-${OUT:-gpu-checks}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date -u +%T))"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc in $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

step prepare 120 bash -c "python3 data_prep/shakespeare_char/prepare.py && python3 data_prep/shakespeare/prepare.py"

# 1. GPT-2 124M: gpt-train's loop against a plain compiled bf16 PyTorch step
step gpu_gpt2 240 python3 benchmarks/gpu_gpt2.py

# 2. The memory estimate against the measured peak: GPT-2 124M eager and compiled, the gpt2-xl shape
#    full, with 8-bit AdamW and with LoRA (peak memory and tokens/s of each)
step memory 240 python3 benchmarks/memory_estimate.py --device=cuda

# 3. bench.py on the GPT-2 preset (12 x 1024, 40 micro-steps: 491,520 tokens per iteration)
step bench_gpt2 150 python3 bench.py configs/train_gpt2.py --dataset=shakespeare --bench_warmup=2 --bench_iters=4

# 4. One-GPU FSDP2: train, save, resume, sample
fsdp="accelerate launch --config_file accelerate_configs/fsdp_8xa100.yaml --num_processes 1 train.py configs/train_shakespeare_char.py --out_dir=out-fsdp --eval_interval=150 --eval_iters=20 --log_interval=50"
step fsdp_train 150 $fsdp --max_iters=300
step fsdp_resume 150 $fsdp --max_iters=450 --init_from=resume
step fsdp_sample 90 python3 sample.py --out_dir=out-fsdp --num_samples=2 --max_new_tokens=200

# 5. Profile of GPT-2 124M steps (one micro-step each), compiled
step profile 150 python3 bench.py configs/train_gpt2.py --dataset=shakespeare --gradient_accumulation_steps=1 \
    --bench_warmup=8 --bench_iters=5 --profile=True --trace_file="$OUT/trace.json"
[ -f "$OUT/trace.json" ] && gzip -f "$OUT/trace.json"
ls -la "$OUT"
