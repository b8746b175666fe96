# finetune_shakespeare.py with LoRA: gpt2-xl's weights frozen, low-rank adapters on its attention
# and MLP projections trained (peft). AdamW's state covers the adapters alone (about 0.5% of the
# weights at r=8), so the run fits a 24 GB card where full fine-tuning needs ~25 GB before
# activations. out_dir gets the merged model (sample.py, pipeline(), lm-eval use it as it is) and
# out_dir/adapter/ the adapter alone (peft's PeftModel / AutoPeftModelForCausalLM).
import time

out_dir = 'out-shakespeare-lora'
eval_interval = 5
eval_iters = 40
wandb_log = False # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'ft-lora-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl' # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter, as the full fine-tune
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

finetune_method = 'lora'
lora_r = 8
lora_alpha = 16
lora_dropout = 0.05
# adapters learn at a higher rate than a full fine-tune's 3e-5 (their updates start from zero)
learning_rate = 2e-4
decay_lr = False
