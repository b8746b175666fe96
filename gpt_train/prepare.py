"""Writing prepared datasets: the one bin writer every data_prep script uses.

A dataset folder gets `train.bin` and `val.bin` (uint16 token ids, nanoGPT's format), the
tokenizer that encoded them (so training and sampling decode with the same one), and for
char-level data nanoGPT's `meta.pkl`. Files are written next to their final name and moved
into place only when complete, so a failed run never leaves a half-written dataset behind.

Not here: reading datasets (gpt_train.data).
"""
import difflib
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from gpt_train.config import load_config, setting
from gpt_train.data import TOKEN_DTYPE
from gpt_train.errors import UserError, exit_on_user_error

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SHAKESPEARE = os.path.join(REPO_ROOT, "data_prep", "tinyshakespeare", "input.txt")


def check_token_range(ids, what):
    top = int(np.max(ids)) if len(ids) else 0
    if top > np.iinfo(TOKEN_DTYPE).max:
        raise UserError(f"{what} holds token id {top}, which does not fit uint16 "
                        f"(max {np.iinfo(TOKEN_DTYPE).max}): use a vocabulary of at most 65,536 tokens")


def write_bin(path, ids):
    """Write token ids to `path` as uint16, atomically."""
    ids = np.asarray(ids)
    check_token_range(ids, path)
    with _atomic_path(path) as tmp:
        ids.astype(TOKEN_DTYPE).tofile(tmp)


def write_meta(out_dir, meta):
    with _atomic_path(os.path.join(out_dir, "meta.pkl")) as tmp, open(tmp, "wb") as f:
        pickle.dump(meta, f)


def save_tokenizer(out_dir, tokenizer):
    """Save the tokenizer files into `out_dir`, so AutoTokenizer.from_pretrained(out_dir) loads it."""
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))


class _atomic_path:
    """A temporary sibling of `path` that replaces it only if the block succeeds."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp's 0600 would make datasets private

    def __enter__(self):
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)
        return False


@dataclass
class CharPrepareConfig:
    input: str = setting(TINY_SHAKESPEARE, "text file to encode")
    out_dir: str = setting("", "output folder; empty means data/<dataset name>")
    val_fraction: float = setting(0.1, "share of the text, taken from its end, held out for validation")

    def validate(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not os.path.isfile(self.input):
            raise UserError(f"input text {self.input} not found")
        return self


def prepare_char_dataset(name, argv):
    """nanoGPT's char-level preparation: vocabulary = the sorted set of characters in the text."""
    from gpt_train.tokenizer import char_tokenizer  # transformers is slow to import; only here

    cfg = load_config(argv, CharPrepareConfig)
    out_dir = cfg.out_dir or os.path.join("data", name)
    with open(cfg.input, encoding="utf-8") as f:
        text = f.read()
    print(f"length of dataset in characters: {len(text):,}")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    print(f"vocab size: {len(chars):,}")
    cut = int(len(text) * (1 - cfg.val_fraction))
    os.makedirs(out_dir, exist_ok=True)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        ids = np.fromiter((stoi[c] for c in part), dtype=np.int64, count=len(part))
        print(f"{split} has {len(ids):,} tokens")
        write_bin(os.path.join(out_dir, f"{split}.bin"), ids)
    write_meta(out_dir, {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi})
    save_tokenizer(out_dir, char_tokenizer(stoi))
    print(f"wrote {out_dir}")


# `gpt-prepare NAME [--key=value ...]`: the data_prep scripts' work by dataset name, for the entry point.
PREPARERS = {"shakespeare_char": prepare_char_dataset}


@exit_on_user_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = ", ".join(PREPARERS)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: gpt-prepare DATASET [--key=value ...]   (DATASET: {names})\n"
              "       gpt-prepare DATASET --help   lists that dataset's settings")
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in PREPARERS:
        near = difflib.get_close_matches(name, PREPARERS, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise UserError(f"unknown dataset {name!r}{hint} (known: {names})")
    PREPARERS[name](name, rest)
