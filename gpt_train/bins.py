"""Prepared bins as a run's training data (gpt_train.data's TrainingData): train.bin and val.bin
as data_prep writes them, training and evaluation batches drawn from the same files.

The place in the data is the iteration number alone (BlockSampler seeds every draw by it), so
a checkpoint holds nothing of the bins and a resume needs nothing back.

Not here: the files' format and the sampler (gpt_train.data), writing them (gpt_train.prepare).
"""
import os

from gpt_train.data import BlockSampler, open_dataset
from gpt_train.tokenizer import dataset_tokenizer


class BinData:
    """data_dir's bins, opened and checked before any weights load."""

    def __init__(self, cfg, folder, processes):
        self.name = cfg.resolved_data_dir
        bins = open_dataset(self.name, cfg.block_size, prepare_hint(cfg))
        self.tokenizer = dataset_tokenizer(self.name)
        self.sampler = BlockSampler(bins, cfg.block_size, cfg.batch_size, cfg.seed, processes.device)

    def batches(self, accelerator, iteration, micro_steps):
        while True:
            offsets = self.sampler.iteration_offsets("train", iteration, micro_steps * accelerator.num_processes)
            targets = self.sampler.targets_per_batch("train", offsets)
            with accelerator.split_between_processes(offsets) as rows:  # each process its own micro_steps rows
                yield from ((*self.sampler.batch("train", row), targets) for row in rows)
            iteration += 1

    def ended(self, iteration, max_iters):
        raise AssertionError("bins are sampled, never read to an end")

    def retokenize(self, where):
        return f"prepare the data with the model's tokenizer (data_prep/custom/prepare.py --tokenizer_from={where})"

    def save_state(self, folder):
        pass  # the iteration number is the whole place

    def load_state(self, folder):
        pass

    def close(self):
        pass  # memmaps are opened per batch


def prepare_hint(cfg):
    """How to make the bins cfg names, for a dataset folder that is missing or damaged."""
    script = os.path.join("data_prep", cfg.dataset, "prepare.py")
    hint = f"python {script}" if os.path.exists(script) else "a data_prep/ script (see README)"
    if cfg.dataset == "openwebtext":  # the default: someone trying things out wants the small data
        hint += (" (a 54 GB download; to try gpt-train on a laptop instead: python data_prep/shakespeare_char/"
                 "prepare.py, then pass configs/train_shakespeare_char_cpu.py)")
    return hint
