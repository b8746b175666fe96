"""OpenWebText in GPT-2 BPE, nanoGPT's recipe: ~9B train tokens (17 GB), ~4M val tokens.

`load_dataset("openwebtext")` (about 54 GB in the Hugging Face cache, 8,013,769 documents),
0.0005 of the documents held out for validation with seed 2357, each document encoded with
GPT-2 BPE and ended with <|endoftext|> (50256), everything written to uint16 train.bin and
val.bin without ever holding the corpus in memory. `--source` takes local files instead
(.jsonl/.parquet/.txt) through the same code path.

    python data_prep/openwebtext/prepare.py [--num_proc=8] [--source=openwebtext]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gpt_train.commands import prepare as main  # noqa: E402  (the same preparer as `gpt-prepare openwebtext`)

if __name__ == "__main__":
    main(["openwebtext", *sys.argv[1:]])
