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
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gpt_train.config import setting  # noqa: E402
from gpt_train.errors import exit_on_user_error  # noqa: E402
from gpt_train.prepare import OWT_SPLIT_SEED, OWT_VAL_FRACTION, CorpusConfig, prepare_corpus  # noqa: E402


@dataclass
class OpenWebTextConfig(CorpusConfig):
    source: str = setting("openwebtext", "Hub dataset name, or local files with the same 'text' column")
    name: str = setting("openwebtext", "dataset name, written to data/<name>")
    val_fraction: float = setting(OWT_VAL_FRACTION, "share of the documents held out for validation")
    split_by: str = setting("documents", "a seeded random share of the documents is val, as in nanoGPT")


@exit_on_user_error
def main(argv):
    prepare_corpus(argv, OpenWebTextConfig)


if __name__ == "__main__":
    main(sys.argv[1:])
