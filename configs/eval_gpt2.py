# evaluate the base gpt2
# n_layer=12, n_head=12, n_embd=768
# 124M parameters
batch_size = 8
eval_iters = 500 # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
lm_eval_tasks = 'hellaswag,arc_easy,piqa,lambada_openai' # zero-shot, as GPT-2 papers and lm-eval report them
