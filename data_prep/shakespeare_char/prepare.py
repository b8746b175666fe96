"""Tiny Shakespeare, one token per character: nanoGPT's shakespeare_char dataset.

Writes data/shakespeare_char/{train,val}.bin, meta.pkl (byte-for-byte what nanoGPT writes)
and a char-level tokenizer that AutoTokenizer loads. The text ships with the repo, so no
network is needed.

    python data_prep/shakespeare_char/prepare.py [--out_dir=data/shakespeare_char]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gpt_train.errors import exit_on_user_error  # noqa: E402
from gpt_train.prepare import prepare_char_dataset  # noqa: E402


@exit_on_user_error
def main(argv):
    prepare_char_dataset("shakespeare_char", argv)


if __name__ == "__main__":
    main(sys.argv[1:])
