#!/bin/bash
# Hugging Face Jobs: the GPT-2 124M reproduction on 8 A100s, the run folder in a Storage Bucket.
#   bash recipes/hf_jobs.sh my-user/gpt2-124m [--dry-run]   (the bucket created first; hf jobs's
#                                                             own flags after it, --dry-run shows the job)
# A job that fails is started again up to --attempts times; each start continues from the last
# checkpoint in the bucket (--resume_from_checkpoint=True, docs/out-dir.md). --timeout ends the job
# with SIGTERM: the processes save at the next step boundary, and the same command continues it.
# GPT_TRAIN_REPO: the repository the job clones (your fork, or a tag of it).
# tests/test_recipes.py submits it with --dry-run and runs its torchrun line on CPU.
set -euo pipefail
BUCKET=${1:?usage: bash recipes/hf_jobs.sh USER/BUCKET [hf jobs run flags]}
REPO=${GPT_TRAIN_REPO:-https://github.com/gpt-train/gpt-train}
hf jobs run --flavor=a100x8 --timeout=2d --attempts=3 --secrets=HF_TOKEN --secrets=WANDB_API_KEY "${@:2}" \
    python:3.11 \
    bash -c "git clone --depth=1 $REPO /gpt-train && cd /gpt-train \
&& pip install -r requirements.txt && python data_prep/openwebtext/prepare.py \
&& torchrun --standalone --nproc_per_node=8 train.py configs/train_gpt2.py \
--out_dir=hf://buckets/$BUCKET --resume_from_checkpoint=True"
