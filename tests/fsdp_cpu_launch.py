"""train.py under real FSDP2 on CPU processes, for tests/test_fsdp.py (run by `accelerate launch`).

Accelerate switches FSDP on only when the processes run on an accelerator: it picks FSDP for a
MULTI_GPU-like distributed type and never for MULTI_CPU. PyTorch's FSDP2 (fully_shard,
torch.distributed.checkpoint) itself runs on CPU over gloo. So this lifts that one gate and
nothing else: the launcher, the YAML, the FSDP plugin, the sharding, the sharded save and load
and the gathering of the full model are all Accelerate's and PyTorch's real code.
"""
from accelerate import PartialState
from accelerate.utils import DistributedType

from gpt_train.commands import train as main

PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU  # gloo, CPU tensors: only the label changes
main()
