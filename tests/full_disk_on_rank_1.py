"""Run a training script where process 1 finds the disk full when it saves its part.

    accelerate launch ... tests/full_disk_on_rank_1.py train.py --key=value ...

The other processes' writes succeed: the save must still fail on every process, not leave
them waiting for process 1 at the next collective. Process 1 writes its RNG state with
torch.save and, under FSDP, its shards through torch.distributed.checkpoint's file writer.
"""
import errno
import os
import runpy
import sys

import torch
import torch.distributed.checkpoint.filesystem as dcp_files


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


if os.environ.get("RANK") == "1":
    torch.save = dcp_files._write_item = full_disk
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
