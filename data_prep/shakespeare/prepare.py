"""Tiny Shakespeare in GPT-2 BPE: nanoGPT's data/shakespeare, byte for byte.

The first 90% of the characters become train.bin (301,966 tokens), the rest val.bin
(36,059), encoded with GPT-2 BPE and no end-of-text token, as nanoGPT does. The GPT-2
tokenizer is saved next to the bins. The text and the BPE files ship with the repo.

    python data_prep/shakespeare/prepare.py [--out_dir=data/shakespeare]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gpt_train.errors import exit_on_user_error  # noqa: E402
from gpt_train.prepare import ShakespeareConfig, prepare_corpus  # noqa: E402


@exit_on_user_error
def main(argv):
    prepare_corpus(argv, ShakespeareConfig)


if __name__ == "__main__":
    main(sys.argv[1:])
