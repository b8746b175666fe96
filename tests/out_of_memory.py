"""Run a training script where a training forward of more than OOM_ROWS rows runs out of memory,
as CUDA would say it, on the process OOM_RANK (all processes if unset).

    OOM_ROWS=2 [OOM_RANK=1] accelerate launch ... tests/out_of_memory.py train.py --key=value ...

In-process tests call `inject(rows)` instead.
"""
import os
import runpy
import sys

import torch
from transformers import GPT2Model


def inject(rows):
    """GPT-2's forward (the transformer under the LM head, which chunked_loss calls too) raises
    CUDA's out-of-memory error for a training micro-batch of more than `rows` rows."""
    forward = GPT2Model.forward

    def out_of_memory(self, input_ids=None, *args, **kwargs):
        if input_ids is not None and input_ids.shape[0] > rows and torch.is_grad_enabled():
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected: more than "
                                         f"{rows} rows)")
        return forward(self, input_ids, *args, **kwargs)

    GPT2Model.forward = out_of_memory
    return forward


if __name__ == "__main__":
    if os.environ.get("OOM_RANK") in (None, os.environ.get("RANK")):
        inject(int(os.environ["OOM_ROWS"]))
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
