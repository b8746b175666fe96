"""Prepared datasets: uint16 token bins read through np.memmap, the block sampler, and the one
interface every kind of training data offers the loop (TrainingData).

A dataset folder holds `train.bin` and `val.bin` (flat uint16 token ids, nanoGPT's format)
and optionally `meta.pkl` (nanoGPT's char vocabulary) and tokenizer files. The sampler
draws random blocks; which blocks an iteration sees depends only on (seed, split,
iteration), not on the number of processes or on where a run was resumed, so a resumed or
re-sharded run reads exactly the data the uninterrupted one would have.

Not here: writing bins (gpt_train.prepare) or tokenizers (gpt_train.tokenizer); the kinds of
training data themselves (gpt_train.bins, gpt_train.stream).
"""
import math
import os
import pickle
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from gpt_train.errors import UserError

TOKEN_DTYPE = np.uint16  # nanoGPT's format: GPT-2's 50,257 ids fit, and it halves the disk
MASK_DTYPE = np.uint8  # a chat dataset's loss mask (gpt_train.chat): 1 where the token is the assistant's
MASK_SUFFIX = ".mask.bin"  # train.mask.bin beside train.bin
IGNORE_INDEX = -100  # a target the loss skips (transformers' and torch's convention)
MAX_VOCAB = np.iinfo(TOKEN_DTYPE).max + 1  # 65,536 ids
SPLITS = ("train", "val")
TOKEN_SCAN_CHUNK = 1 << 25  # tokens per np.max when checking ids: 64 MB of memory at a time
STREAMS = (("train", "step"), ("train", "eval"), ("val", "eval"))  # independent random streams


class TrainingData(Protocol):
    """What a run's data offer the loop, whatever they are read from: prepared bins (gpt_train.bins),
    a `datasets` stream (gpt_train.stream). A new kind of training input is a module with a class of
    this shape, and one line of gpt_train.train.build that picks it."""

    name: str  # how messages name the data
    tokenizer: object  # the tokenizer the data were (or are being) encoded with
    sampler: "BlockSampler"  # evaluation batches (its bins: the evaluation tokens)

    def batches(self, accelerator, iteration, micro_steps):
        """This process's (x, y, targets) micro-batches, from `iteration` on; they end, on every
        process at once, where the data do. `targets`: see BlockSampler.targets_per_batch."""

    def ended(self, iteration, max_iters):
        """What to say when the batches ended before max_iters."""

    def retokenize(self, where):
        """How to encode the data with the tokenizer of the model at `where` instead."""

    def save_state(self, folder):
        """This process's place in the data, into a checkpoint's training-state folder."""

    def load_state(self, folder):
        """The place save_state wrote, before the first batch."""

    def close(self):
        """Let go of what reads the data (threads, files); the run is over."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers; refuses anything that would import code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}")


def read_meta(data_dir):
    """nanoGPT's meta.pkl as a dict, or None if the folder has none."""
    path = os.path.join(data_dir, "meta.pkl")
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            meta = _PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a plain nanoGPT meta.pkl ({e}); refusing to load it. "
                        "Re-run the dataset's prepare.py") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} must hold a dict, found {type(meta).__name__}")
    return meta


@dataclass
class TokenBins:
    """Where a dataset's bins live and what they hold; memmaps are opened per batch."""

    data_dir: str
    lengths: dict  # split -> number of tokens
    vocab_size: int | None  # from meta.pkl; None means GPT-2 BPE
    masked: bool = False  # a chat dataset: the loss counts the tokens its masks mark

    def memmap(self, split):
        # A fresh memmap per batch, as nanoGPT does: a long-lived one keeps every page it
        # ever touched mapped, and resident memory grows through a 17 GB corpus.
        return np.memmap(os.path.join(self.data_dir, f"{split}.bin"), dtype=TOKEN_DTYPE, mode="r")

    def mask(self, split):
        return np.memmap(os.path.join(self.data_dir, split + MASK_SUFFIX), dtype=MASK_DTYPE, mode="r")


def open_dataset(data_dir, block_size, prepare_hint):
    """Check a dataset folder and describe it, or say exactly what is wrong with it."""
    if not os.path.isdir(data_dir):
        raise UserError(f"dataset folder {data_dir} not found: prepare it with {prepare_hint}")
    lengths = {}
    for split in SPLITS:
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: prepare the dataset with {prepare_hint}")
        size = os.path.getsize(path)
        if size % np.dtype(TOKEN_DTYPE).itemsize:
            raise UserError(f"{path} has {size} bytes, not a whole number of uint16 tokens: "
                            f"it is truncated or not a token file; prepare it again with {prepare_hint}")
        lengths[split] = size // np.dtype(TOKEN_DTYPE).itemsize
        if lengths[split] < block_size + 1:
            raise UserError(f"{path} has {lengths[split]} tokens, fewer than block_size+1 = {block_size + 1}: "
                            "lower block_size or add data")
    masks = [os.path.join(data_dir, split + MASK_SUFFIX) for split in SPLITS]
    masked = any(os.path.exists(path) for path in masks)
    for split, path in zip(SPLITS, masks, strict=True):
        if masked and (not os.path.isfile(path) or os.path.getsize(path) != lengths[split]):
            raise UserError(f"{path} is missing or not one byte per token of {split}.bin: prepare the chat dataset "
                            "again (data_prep/chat/prepare.py)")
    meta = read_meta(data_dir)
    return TokenBins(data_dir, lengths, meta.get("vocab_size") if meta else None, masked)


def bytes_per_token(bins, split, byte_lengths):
    """The mean bytes of text per token of `split` (byte_lengths[id]: what each id stands for);
    a loss in nats per token over it, / ln 2, is bits per byte, comparable across tokenizers."""
    data, total, tokens = bins.memmap(split), 0, 0
    for start in range(0, len(data), TOKEN_SCAN_CHUNK):
        chunk = data[start:start + TOKEN_SCAN_CHUNK]
        if bins.masked:  # a chat dataset's loss is over the assistant's tokens: so are its bytes
            chunk = chunk[bins.mask(split)[start:start + TOKEN_SCAN_CHUNK] == 1]
        counts = np.bincount(chunk, minlength=len(byte_lengths))
        total += int(counts[:len(byte_lengths)] @ byte_lengths)
        tokens += len(chunk)
    return total / tokens if tokens else 0.0


def bits_per_byte(loss, bytes_per_token):
    """nats per token -> bits per byte of text: what a char, a GPT-2 BPE and an 8K BPE model of
    the same text can be compared by."""
    return loss / math.log(2) / bytes_per_token if bytes_per_token else math.nan


def check_token_ids(bins, vocab_size):
    """Refuse ids the model has no embedding for: data prepared with another tokenizer.

    A full scan with np.max over the memmap, chunk by chunk so memory stays bounded; it
    reads the bins once at disk speed (a 200 MB bin: see README, Reliability).
    """
    for split in SPLITS:
        data = bins.memmap(split)
        for start in range(0, len(data), TOKEN_SCAN_CHUNK):
            top = int(data[start:start + TOKEN_SCAN_CHUNK].max())
            if top >= vocab_size:
                raise UserError(f"{os.path.join(bins.data_dir, split + '.bin')} holds token id {top} but the "
                                f"model has {vocab_size} ids: the data were prepared with another tokenizer; "
                                "prepare them again for this model")


class BlockSampler:
    """Random (x, y) blocks, y being x shifted by one token, as in nanoGPT's get_batch.

    `iteration_offsets` draws every block of one optimizer step (all micro-steps of all
    processes) from a generator seeded by (seed, split, iteration); each process then reads
    its own rows. The global batch is thus the same for 1 or N processes, and resuming
    needs no sampler state beyond the iteration number.
    """

    def __init__(self, bins, block_size, batch_size, seed, device):
        self.bins, self.block_size, self.batch_size = bins, block_size, batch_size
        self.seed, self.device = seed, torch.device(device)

    def iteration_offsets(self, split, iteration, micro_batches, purpose="step"):
        """Start offsets of shape (micro_batches, batch_size) for one iteration of `split`.

        `purpose` keeps the blocks of training steps and of evaluations apart.
        """
        # SeedSequence mixes all three into one 32-bit seed; torch's CPU generator ignores higher bits.
        entropy = [self.seed, STREAMS.index((split, purpose)), iteration]
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        high = self.bins.lengths[split] - self.block_size
        return torch.randint(high, (micro_batches, self.batch_size), generator=generator)

    def batch(self, split, offsets):
        data = self.bins.memmap(split)
        rows = np.stack([data[i:i + self.block_size + 1] for i in offsets.tolist()]).astype(np.int64)
        if not self.bins.masked:
            tokens = self._to_device(torch.from_numpy(rows))
            return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        # a chat dataset: targets its mask leaves out (the user's turns) are skipped by the loss
        mask = self.bins.mask(split)
        y = rows[:, 1:].copy()
        y[np.stack([mask[i + 1:i + self.block_size + 1] for i in offsets.tolist()]) == 0] = IGNORE_INDEX
        return self._to_device(torch.from_numpy(rows[:, :-1].copy())), self._to_device(torch.from_numpy(y))

    def targets_per_batch(self, split, offsets):
        """For a chat dataset, the target tokens (the assistant's) of all these batches, per batch
        (at least 1); None for plain text, whose loss is a mean over every token."""
        if not self.bins.masked:
            return None
        mask = self.bins.mask(split)
        total = sum(int(mask[i + 1:i + self.block_size + 1].sum()) for i in offsets.flatten().tolist())
        return max(total, 1) / offsets.shape[0]

    def _to_device(self, tokens):
        return to_device(tokens, self.device)


def to_device(tokens, device):
    if device.type == "cuda":  # pinned host memory lets the copy overlap the previous step's compute
        return tokens.pin_memory().to(device, non_blocking=True)
    return tokens.to(device)
