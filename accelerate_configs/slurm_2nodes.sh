#!/bin/bash
# GPT-2 124M on two 8-GPU nodes under SLURM: one task per node, each starting 8 processes.
#   sbatch accelerate_configs/slurm_2nodes.sh
# data/ and out_dir must be on a filesystem both nodes see (checkpoints are written by the
# main process, training state by every rank). If a node dies the job fails; resubmit it and it
# continues from the last checkpoint (train_gpt2 sets resume_from_checkpoint=True).
#SBATCH --job-name=gpt2-124m
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=5-00:00:00
set -euo pipefail

MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun bash -c "accelerate launch \
    --config_file accelerate_configs/2x8xa100.yaml \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_IP \
    train.py configs/train_gpt2.py --gradient_accumulation_steps=32 --batch_size=15 $*"
