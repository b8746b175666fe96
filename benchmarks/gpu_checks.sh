#!/usr/bin/env bash
# The GPU checks of one short device session (issue 24's goals), most important first, within
# GPU_CHECKS_BUDGET seconds in all (default 480): each step gets its own limit, cut to what is left,
# and writes its log as it ends, so a cut run still reports the first goals. A second device call
# continues with GPU_CHECKS_FROM=<step> (the steps before it are skipped). Run from the repository
# root on a CUDA machine, with .carry/ from benchmarks/gpu_carry.sh beside it:
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
# Logs (and a profiler trace) go to OUT_DIR (default gpu-checks/); summary.md gathers the tables.
set -u
OUT=${1:-${OUT:-gpu-checks}}
BUDGET=${GPU_CHECKS_BUDGET:-480}
FROM=${GPU_CHECKS_FROM:-}
NANOGPT=${NANOGPT:-.carry/nanoGPT}
WHEELS=${GPU_CHECKS_WHEELS:-.carry/wheels}
SITE=${GPU_CHECKS_SITE:-/tmp/site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # the pinned packages the device's image lacks (Python 3.12's)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    if [ -n "$FROM" ] && [ "$name" != "$FROM" ]; then echo "=== $name: skipped (GPU_CHECKS_FROM=$FROM)"; return; fi
    FROM=""
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 30 ]; then echo "=== $name: skipped, $left s of the budget left"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name ($(date -u +%T), limit $limit s)"
    local t0=$SECONDS
    # KILL, not TERM: a gpt-train run given SIGTERM saves at its next step boundary, past the limit
    timeout -s KILL "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$OUT/$name.log"
    grep -h "^|" "$OUT/$name.log" >>"$OUT/summary.md"
    echo "=== $name: exit $rc in $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)" | tee -a "$OUT/device.txt"
date -u +%F >>"$OUT/device.txt"

[ -f data/shakespeare/train.bin ] && [ -f data/shakespeare_char/train.bin ] || \
    step prepare 90 bash -c "python3 data_prep/shakespeare_char/prepare.py && python3 data_prep/shakespeare/prepare.py"

# Goal 1: GPT-2 124M at 491,520 tokens per iteration, compiled bf16: nanoGPT's train.py against gpt-train
step gpt2 240 python3 benchmarks/side_by_side.py --case=gpt2 --nanogpt="$NANOGPT" --iters=8 --warmup=2 \
    --only="nanoGPT train.py,gpt-train"

# Goal 3: the GPU speedrun against nanoGPT's own shakespeare_char run (its score is the target), one seed
step speedrun 260 python3 benchmarks/time_to_target.py --gpu --nanogpt="$NANOGPT" --skip_recipe --seeds=1337

# Goal 1's levers: the chunked loss at 12 x 40 (the same batches: its losses against the default's), 24 x 20
step gpt2_levers 200 python3 benchmarks/side_by_side.py --case=gpt2 --iters=8 --warmup=2 \
    --only="gpt-train,gpt-train chunked loss,gpt-train 24x20 chunked"

# Goal 2: gpt2-xl's shape at finetune_shakespeare's settings, eager: peak memory and tokens/s
step xl 180 python3 benchmarks/side_by_side.py --case=xl --nanogpt="$NANOGPT" --iters=6 --warmup=2

# Goal 4: Muon against AdamW at GPT-2 scale: step time, and val loss after the same 60 steps
step muon 150 python3 benchmarks/side_by_side.py --case=muon --iters=60 --warmup=5

# Goal 3's other seeds, against the target the speedrun step printed
target=$(grep -o "target [0-9.]*" "$OUT/speedrun.log" 2>/dev/null | head -1 | cut -d' ' -f2)
[ -n "$target" ] && step speedrun_seeds 150 python3 benchmarks/time_to_target.py --gpu --target="$target" \
    --skip_recipe --seeds=1,2

# Then: the memory estimate against measured peaks, one-GPU FSDP, a profile of the compiled step
step memory 240 python3 benchmarks/memory_estimate.py --device=cuda
rm -rf "$OUT/out-fsdp"
fsdp="accelerate launch --config_file accelerate_configs/fsdp_8xa100.yaml --num_processes 1 train.py configs/train_shakespeare_char.py --out_dir=$OUT/out-fsdp --eval_interval=150 --eval_iters=20 --log_interval=50"
step fsdp_train 150 $fsdp --max_iters=300
step fsdp_resume 150 $fsdp --max_iters=450 --init_from=resume
rm -rf "$OUT/out-fsdp"
step profile 150 python3 bench.py configs/train_gpt2.py --dataset=shakespeare --gradient_accumulation_steps=1 \
    --bench_warmup=8 --bench_iters=5 --profile=True --trace_file="$OUT/trace.json"
[ -f "$OUT/trace.json" ] && gzip -f "$OUT/trace.json"
echo "=== done in $SECONDS s of $BUDGET"
ls -la "$OUT"
