"""Tiny Shakespeare in GPT-2 BPE: nanoGPT's data/shakespeare, byte for byte.

The first 90% of the characters become train.bin (301,966 tokens), the rest val.bin
(36,059), encoded with GPT-2 BPE and no end-of-text token, as nanoGPT does. The GPT-2
tokenizer is saved next to the bins. The text and the BPE files ship with the repo.

    python data_prep/shakespeare/prepare.py [--out_dir=data/shakespeare]
"""
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gpt_train.config import setting  # noqa: E402
from gpt_train.errors import exit_on_user_error  # noqa: E402
from gpt_train.prepare import TINY_SHAKESPEARE, CorpusConfig, prepare_corpus  # noqa: E402


@dataclass
class ShakespeareConfig(CorpusConfig):
    source: str = setting(TINY_SHAKESPEARE, "the text to encode")
    name: str = setting("shakespeare", "dataset name, written to data/<name>")
    split_by: str = setting("tail", "the last val_fraction of the text is val, as in nanoGPT")
    append_eot: bool = setting(False, "nanoGPT's Shakespeare has no end-of-text token")
    num_proc: int = setting(1, "one document: one worker")


@exit_on_user_error
def main(argv):
    prepare_corpus(argv, ShakespeareConfig)


if __name__ == "__main__":
    main(sys.argv[1:])
