#!/bin/bash
# A pre-emptible run under SLURM: requeued when pre-empted (scontrol requeue, a partition's
# PreemptMode=REQUEUE) or when its time limit comes, saving on the signal each time, and each
# start continuing from the last checkpoint (--resume_from_checkpoint=True).
#   sbatch --gpus-per-node=8 --cpus-per-task=64 accelerate_configs/slurm_requeue.sh configs/train_gpt2.py
# Settings after the script go to train.py. GPT_TRAIN_LAUNCH replaces the launcher (default
# torchrun with one process per GPU of the node). One node; out_dir on a disk the next start sees
# (a shared filesystem, or --out_dir=s3://...: docs/out-dir.md).
#SBATCH --job-name=gpt-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=1-00:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

LAUNCH=${GPT_TRAIN_LAUNCH:-"torchrun --standalone --nproc_per_node=${SLURM_GPUS_ON_NODE:-1}"}
echo "gpt-train: job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0} on $(hostname)"

# SIGTERM reaches this script two minutes before the time limit (--signal=B:TERM@120), or with the
# rest of the job when it is pre-empted: the training processes save at their next step boundary
# and exit, and a time limit's job is put back in the queue to go on.
# (srun itself would take a SIGTERM as "cancel the step now": scancel signals the step's tasks instead)
signalled=
trap 'signalled=1; scancel --signal=TERM "$SLURM_JOB_ID"' TERM
# shellcheck disable=SC2086  # LAUNCH is a command line
srun --kill-on-bad-exit=1 $LAUNCH train.py "$@" --resume_from_checkpoint=True &
step=$!
wait "$step"
status=$?
while kill -0 "$step" 2>/dev/null; do  # the trap ended the first wait: wait for the save
    wait "$step"
    status=$?
done
if [ -n "$signalled" ]; then
    echo "gpt-train: job $SLURM_JOB_ID saved on SIGTERM; requeued to continue"
    scontrol requeue "$SLURM_JOB_ID" 2>/dev/null || true  # pre-empted: SLURM requeues it itself
fi
exit "$status"
