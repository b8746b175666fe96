# Chat fine-tuning: GPT-2 (124M) taught to answer on the tiny conversation set in the repo,
# the loss on the assistant's tokens only. Prepare the data with the model's tokenizer first:
#   python data_prep/chat/prepare.py --source=data_prep/chat/tiny_chats.jsonl --tokenizer_from=gpt2
#   python train.py configs/finetune_chat.py
#   echo "What is 7 plus 5?" | python sample.py --out_dir=out-chat --chat
# Any model folder works as init_from, if the data were prepared with its tokenizer.
out_dir = 'out-chat'
dataset = 'tiny_chats'
init_from = 'gpt2'

eval_interval = 25
eval_iters = 20
log_interval = 5
always_save_checkpoint = False

# conversations are ~30-80 tokens: short blocks, several per batch
block_size = 256
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 150

learning_rate = 1e-4
decay_lr = False
dropout = 0.1
