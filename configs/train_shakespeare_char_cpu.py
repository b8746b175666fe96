# the shakespeare_char model shrunk to nanoGPT's README recipe for a CPU laptop:
# $ python train.py configs/train_shakespeare_char_cpu.py
# about 2 minutes on 2 CPU cores, val loss ~1.9 at iter 2000

out_dir = 'out-shakespeare-char'
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False # we overfit this small dataset: keep the best val loss

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt-cpu'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64 # context of up to 64 previous characters

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0 # too small a model to overfit in 2000 steps

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = 'auto' # the recipe is sized for a laptop CPU; a GPU, if present, just finishes sooner
compile = False # compiling pays off only on long GPU runs
