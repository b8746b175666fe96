# nanoGPT's CPU recipe model (4 layers, 4 heads, 128 wide, context 64, Tiny Shakespeare characters)
# to the recipe's own val loss (1.90 over 500 batches) in under half its wall time:
# $ python train.py configs/speedrun_shakespeare_char_cpu.py
# Muon (torch.optim.Muon, Newton-Schulz in float32 on CPUs) trains the blocks' matrices, AdamW the
# embeddings and LayerNorms, both at higher rates than the recipe, over a schedule sized to 500
# iterations instead of 2000, with one evaluation at the end. Figures: README, "Time to target".

out_dir = 'out-shakespeare-char-speedrun'
eval_interval = 500 # evaluate once at the end (and at iteration 0, as nanoGPT does)
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'speedrun-cpu'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 12 # 24 x 250 iterations reached only 1.98: more, smaller steps win here
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

optimizer = 'muon'
muon_learning_rate = 1e-2 # 5e-3 and 2e-2 were worse
learning_rate = 3e-3 # AdamW's, for embeddings and LayerNorms
max_iters = 500
lr_decay_iters = 500
min_lr = 3e-4
beta2 = 0.99
warmup_iters = 50

device = 'auto'
compile = False # a ~26 s compile is a third of the run
