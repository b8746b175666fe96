"""Prepared data: nanoGPT-identical Shakespeare bins, the memmap sampler, and dataset errors."""
import os
import pickle

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import sha256
from gpt_train.data import BlockSampler, open_dataset, read_meta
from gpt_train.errors import UserError

# sha256 of the files nanoGPT's data/shakespeare_char/prepare.py wrote from the same input.txt.
NANOGPT_SHA256 = {
    "train.bin": "6ec305602a99ac2802745a134e1f5e33e2231b4855525b00b9aebb730ac2626f",
    "val.bin": "d37d30cc0c8327c270d493299c3dca54135f6d5f1c9ef60cda78076e311204b1",
    "meta.pkl": "6ee5a37533af83b67fcbe6b93705fde9e15e78bafe895f54b2cb2cb32534526c",
}


def test_shakespeare_char_is_byte_identical_to_nanogpts(char_data):
    for name, digest in NANOGPT_SHA256.items():
        assert sha256(os.path.join(char_data, name)) == digest, name
    bins = open_dataset(char_data, 256, "prepare")
    assert bins.lengths == {"train": 1_003_854, "val": 111_540}
    assert bins.vocab_size == 65


def test_char_tokenizer_loads_with_autotokenizer_and_matches_the_bins(char_data):
    tokenizer = AutoTokenizer.from_pretrained(char_data)
    with open(os.path.join(os.path.dirname(__file__), "..", "data_prep", "tinyshakespeare", "input.txt")) as f:
        text = f.read()
    train = np.memmap(os.path.join(char_data, "train.bin"), dtype=np.uint16, mode="r")
    ids = tokenizer(text[:2000])["input_ids"]
    assert ids == train[:2000].tolist()
    assert tokenizer.decode(ids) == text[:2000]


def make_bins(folder, train, val, meta=None):
    os.makedirs(folder, exist_ok=True)
    np.asarray(train, dtype=np.uint16).tofile(os.path.join(folder, "train.bin"))
    np.asarray(val, dtype=np.uint16).tofile(os.path.join(folder, "val.bin"))
    if meta is not None:
        with open(os.path.join(folder, "meta.pkl"), "wb") as f:
            pickle.dump(meta, f)
    return str(folder)


def test_blocks_are_shifted_pairs_read_from_the_memmap(tmp_path):
    folder = make_bins(tmp_path / "d", np.arange(1000) % 500, np.arange(300))
    sampler = BlockSampler(open_dataset(folder, 16, "prepare"), 16, 4, seed=1, device="cpu")
    offsets = sampler.iteration_offsets("train", 0, 3)
    assert offsets.shape == (3, 4)
    x, y = sampler.batch("train", offsets[0])
    assert x.dtype == torch.int64 and x.shape == (4, 16)
    for row, start in zip(range(4), offsets[0].tolist()):
        assert x[row].tolist() == [(start + i) % 500 for i in range(16)]
        assert y[row].tolist() == [(start + 1 + i) % 500 for i in range(16)]


def test_sampling_depends_only_on_seed_split_and_iteration(tmp_path):
    folder = make_bins(tmp_path / "d", np.arange(5000), np.arange(5000))
    bins = open_dataset(folder, 8, "prepare")
    a = BlockSampler(bins, 8, 4, seed=7, device="cpu")
    b = BlockSampler(bins, 8, 4, seed=7, device="cpu")
    b.iteration_offsets("train", 3, 2)  # drawing other iterations first changes nothing
    assert torch.equal(a.iteration_offsets("train", 5, 2), b.iteration_offsets("train", 5, 2))
    assert not torch.equal(a.iteration_offsets("train", 5, 2), a.iteration_offsets("train", 6, 2))
    assert not torch.equal(a.iteration_offsets("train", 5, 2), a.iteration_offsets("train", 5, 2, "eval"))
    other_seed = BlockSampler(bins, 8, 4, seed=8, device="cpu")
    assert not torch.equal(a.iteration_offsets("train", 5, 2), other_seed.iteration_offsets("train", 5, 2))


def test_missing_dataset_names_the_prepare_command(tmp_path):
    with pytest.raises(UserError, match="prepare it with python data_prep/x/prepare.py"):
        open_dataset(str(tmp_path / "nope"), 8, "python data_prep/x/prepare.py")
    os.makedirs(tmp_path / "half")
    np.zeros(100, np.uint16).tofile(tmp_path / "half" / "train.bin")
    with pytest.raises(UserError, match="val.bin not found"):
        open_dataset(str(tmp_path / "half"), 8, "prepare")


def test_bin_with_odd_byte_count_is_refused(tmp_path):
    folder = make_bins(tmp_path / "d", np.arange(100), np.arange(100))
    with open(os.path.join(folder, "val.bin"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="not a whole number of uint16"):
        open_dataset(folder, 8, "prepare")


def test_dataset_shorter_than_a_block_is_refused(tmp_path):
    folder = make_bins(tmp_path / "d", np.arange(100), np.arange(10))
    with pytest.raises(UserError, match="val.bin has 10 tokens, fewer than block_size\\+1 = 33"):
        open_dataset(folder, 32, "prepare")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_meta_pkl_that_would_run_code_is_refused(tmp_path):
    folder = make_bins(tmp_path / "d", np.arange(100), np.arange(100), meta={"vocab_size": 65, "x": RunsCode()})
    with pytest.raises(UserError, match="not a plain nanoGPT meta.pkl"):
        read_meta(folder)


def test_nanogpt_folder_without_tokenizer_files_still_trains_its_vocab(tmp_path):
    meta = {"vocab_size": 3, "stoi": {"a": 0, "b": 1, "\n": 2}, "itos": {0: "a", 1: "b", 2: "\n"}}
    folder = make_bins(tmp_path / "d", [0, 1, 2] * 50, [1, 0, 2] * 50, meta=meta)
    from gpt_train.tokenizer import dataset_tokenizer
    tokenizer = dataset_tokenizer(folder)
    assert tokenizer("ab\nba")["input_ids"] == [0, 1, 2, 1, 0]
    assert open_dataset(folder, 8, "prepare").vocab_size == 3
