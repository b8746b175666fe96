"""FineWeb-Edu in GPT-2 BPE, as llm.c, build-nanogpt and nanochat train GPT-2 on it: the Hub's
`sample-10BT` subset (~10B tokens: ~20 GB of train.bin at 2 bytes a token, on top of the parquet
download and datasets' Arrow cache of it, each larger than the bins),
OpenWebText's split (0.0005 of the documents held out with seed 2357) and encoding (GPT-2 BPE,
<|endoftext|> after each document), the same uint16 bins, written as the OpenWebText preparer
writes them. `--subset` takes another sample (sample-100BT, sample-350BT) and `--source` local
files with the same 'text' column, through the same code path.

    python data_prep/fineweb_edu/prepare.py [--num_proc=8] [--subset=sample-10BT]
    python train.py configs/train_gpt2.py --dataset=fineweb_edu
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gpt_train.commands import prepare as main  # noqa: E402  (the same preparer as `gpt-prepare fineweb_edu`)

if __name__ == "__main__":
    main(["fineweb_edu", *sys.argv[1:]])
