"""Conversations as a chat fine-tuning dataset: rendered with a chat template, encoded with the
model's tokenizer, the loss mask beside the bins (see gpt_train/chat.py).

    python data_prep/chat/prepare.py --source=data_prep/chat/tiny_chats.jsonl --tokenizer_from=gpt2
    python data_prep/chat/prepare.py --source=HuggingFaceH4/no_robots --tokenizer_from=out-mine

Then fine-tune with --dataset=<name> --init_from=<the same model>, and talk to the result with
python sample.py --out_dir=OUT --chat.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gpt_train.commands import prepare as main  # noqa: E402  (the same preparer as `gpt-prepare chat`)

if __name__ == "__main__":
    main(["chat", *sys.argv[1:]])
