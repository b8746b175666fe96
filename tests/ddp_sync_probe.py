"""Run by tests/test_distributed.py under `accelerate launch`: trains through the real setup()
and fit(), recording for every DDP gradient all-reduce which micro-step's backward it ran in."""
import json
import os
import sys

from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from gpt_train.cli import load_config
from gpt_train.train import fit, setup

run = setup(load_config(sys.argv[1:]))
training_forwards = 0
micro_step_of_allreduce = []


def count_forward(module, args, kwargs):
    global training_forwards
    training_forwards += module.training


def counting_allreduce(process_group, bucket):
    micro_step_of_allreduce.append((training_forwards - 1) % run.micro_steps)
    return allreduce_hook(process_group, bucket)


run.model.register_forward_pre_hook(count_forward, with_kwargs=True)
run.model.register_comm_hook(None, counting_allreduce)
fit(run)
# one write of the whole line: print() writes the text and its newline apart, and with the launcher's
# unbuffered output the other process's line once landed between them
sys.stdout.write("PROBE " + json.dumps({"rank": run.accelerator.process_index, "micro_steps": run.micro_steps,
                                        "micro_step_of_allreduce": sorted(set(micro_step_of_allreduce)),
                                        "allreduces": len(micro_step_of_allreduce)}) + "\n")
sys.stdout.flush()
os._exit(0)  # before Python frees the DDP model: that can hang a gloo run (see gpt_train.errors._exit)
