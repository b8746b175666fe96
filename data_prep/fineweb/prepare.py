"""FineWeb in GPT-2 BPE: the Hub's `sample-10BT` subset of HuggingFaceFW/fineweb, prepared exactly as
data_prep/fineweb_edu/prepare.py prepares FineWeb-Edu (see there).

    python data_prep/fineweb/prepare.py [--num_proc=8] [--subset=sample-10BT]
    python train.py configs/train_gpt2.py --dataset=fineweb
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gpt_train.commands import prepare as main  # noqa: E402  (the same preparer as `gpt-prepare fineweb`)

if __name__ == "__main__":
    main(["fineweb", *sys.argv[1:]])
