# nanoGPT's GPU shakespeare_char model (6 layers, 6 heads, 384 wide, context 256, batch 64, dropout
# 0.2) to the val loss of nanoGPT's own 5000-iteration run in half its wall time, on one GPU:
# $ python train.py configs/speedrun_shakespeare_char.py
# What the CPU speedrun measured carried over: Muon (bf16 Newton-Schulz on CUDA) for the blocks'
# matrices, AdamW for embeddings and LayerNorms at 3x nanoGPT's rate, a schedule sized to 2000
# iterations instead of 5000, and one evaluation at the end instead of twenty of 200 batches.
# NOT YET MEASURED ON A GPU: `benchmarks/time_to_target.py --gpu` (in benchmarks/gpu_checks.sh)
# times it against nanoGPT's run; the iterations and rates are a starting point to tune there.
import os

# train_shakespeare_char.py's data, model, batch and dropout, then what the speedrun changes
exec(open(os.path.join(os.path.dirname(__file__), 'train_shakespeare_char.py')).read())

out_dir = 'out-shakespeare-char-speedrun-gpu'
eval_interval = 2000 # evaluate at the end (and at iteration 0, as nanoGPT does)
eval_iters = 100
log_interval = 100
wandb_run_name = 'speedrun-gpu'
optimizer = 'muon'
muon_learning_rate = 1e-2 # the CPU speedrun's
learning_rate = 3e-3 # AdamW's, for embeddings and LayerNorms
max_iters = 2000
lr_decay_iters = 2000
min_lr = 3e-4
warmup_iters = 50
