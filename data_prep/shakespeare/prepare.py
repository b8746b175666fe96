"""Tiny Shakespeare in GPT-2 BPE: nanoGPT's data/shakespeare, byte for byte.

The first 90% of the characters become train.bin (301,966 tokens), the rest val.bin
(36,059), encoded with GPT-2 BPE and no end-of-text token, as nanoGPT does. The GPT-2
tokenizer is saved next to the bins. The text and the BPE files ship with the repo.

    python data_prep/shakespeare/prepare.py [--out_dir=data/shakespeare]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gpt_train.commands import prepare as main  # noqa: E402  (the same preparer as `gpt-prepare shakespeare`)

if __name__ == "__main__":
    main(["shakespeare", *sys.argv[1:]])
