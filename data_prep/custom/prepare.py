"""Your own data as a gpt-train dataset: local files or a Hub dataset, in GPT-2 BPE, characters,
or a byte-level BPE trained on its train split.

    python data_prep/custom/prepare.py --source=my_book.txt                      # data/my_book
    python data_prep/custom/prepare.py --source='logs/*.jsonl' --text_column=body --name=logs
    python data_prep/custom/prepare.py --source=notes.parquet --tokenizer=char --val_fraction=0.05
    python data_prep/custom/prepare.py --source='wiki_fr/*.txt' --tokenizer=bpe --vocab_size=8192
    python data_prep/custom/prepare.py --source=roneneldan/TinyStories --val_fraction=0.01

A .txt file is one document whose last val_fraction becomes val (as nanoGPT splits
Shakespeare); rows of .jsonl/.json/.parquet files and Hub datasets are documents, a seeded
random val_fraction of which becomes val (as nanoGPT splits OpenWebText). GPT-2 BPE and a
trained BPE end each document with <|endoftext|>. Writes train.bin, val.bin and the tokenizer (plus
nanoGPT's meta.pkl for characters) into data/<name>/, then train with --dataset=<name>.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gpt_train.commands import prepare as main  # noqa: E402  (the same preparer as `gpt-prepare custom`)

if __name__ == "__main__":
    main(["custom", *sys.argv[1:]])
