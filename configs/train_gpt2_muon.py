# GPT-2 124M on OpenWebText with the optimizer and schedule of the published speedruns
# (modded-nanogpt, nanochat): Muon for the blocks' matrices, AdamW for embeddings and LayerNorms,
# warmup-stable-decay. NOT YET MEASURED ON A GPU by gpt-train: the rates are converted from
# modded-nanogpt's and from the CPU speedrun (README, "Time to target"), a starting point to tune.
# $ accelerate launch --config_file accelerate_configs/8xa100.yaml train.py configs/train_gpt2_muon.py
# (DDP only: Muon does not run under FSDP.)

wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M-muon'

# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520 tokens per iteration, as train_gpt2
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

optimizer = 'muon'
# torch's Muon scales each matrix's rate by 0.2 * sqrt(max(rows, cols)) ("match_rms_adamw"):
# 4e-3 is modded-nanogpt's 0.05 on a 768 x 3072 matrix in those units
muon_learning_rate = 4e-3
muon_momentum = 0.95
learning_rate = 1.8e-3 # AdamW's, 3x train_gpt2's (the CPU speedrun's ratio)
min_lr = 0.0
weight_decay = 1e-1

# ~10B tokens instead of train_gpt2's 300B: a speedrun-sized budget
max_iters = 20000
lr_schedule = 'wsd'
warmup_iters = 500
lr_decay_iters = 20000
cooldown_iters = 8000

eval_interval = 1000
eval_iters = 200
log_interval = 10

# A run of days: relaunching this command, by hand or by torchrun (--max_restarts=3), continues
# the checkpoint in out_dir, redoing at most eval_interval iterations (README, "Restarts and lost nodes")
resume_from_checkpoint = True
