# finetune_shakespeare.py with LoRA: gpt2-xl's weights frozen, low-rank adapters on its attention
# and MLP projections trained (peft). AdamW's state covers the adapters alone (about 0.5% of the
# weights at r=8), so the run fits a 24 GB card where full fine-tuning needs ~25 GB before
# activations. out_dir gets the merged model (sample.py, pipeline(), lm-eval use it as it is) and
# out_dir/adapter/ the adapter alone (peft's PeftModel / AutoPeftModelForCausalLM).
import os
import time

# the full fine-tune's settings (data, gpt2-xl, 32,768 tokens per iteration, 20 iterations), then LoRA's
exec(open(os.path.join(os.path.dirname(__file__), 'finetune_shakespeare.py')).read())

out_dir = 'out-shakespeare-lora'
wandb_run_name = 'ft-lora-' + str(time.time())

finetune_method = 'lora'
lora_r = 8
lora_alpha = 16
lora_dropout = 0.05
# adapters learn at a higher rate than a full fine-tune's 3e-5 (their updates start from zero)
learning_rate = 2e-4
