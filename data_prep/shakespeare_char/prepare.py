"""Tiny Shakespeare, one token per character: nanoGPT's shakespeare_char dataset.

Writes data/shakespeare_char/{train,val}.bin, meta.pkl (byte-for-byte what nanoGPT writes)
and a char-level tokenizer that AutoTokenizer loads. The text ships with the repo, so no
network is needed.

    python data_prep/shakespeare_char/prepare.py [--out_dir=data/shakespeare_char]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gpt_train.commands import prepare as main  # noqa: E402  (the same preparer as `gpt-prepare shakespeare_char`)

if __name__ == "__main__":
    main(["shakespeare_char", *sys.argv[1:]])
