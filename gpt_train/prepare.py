"""Writing prepared datasets: the one bin writer every data_prep script uses.

A dataset folder gets `train.bin` and `val.bin` (uint16 token ids, nanoGPT's format), the
tokenizer that encoded them (so training and sampling decode with the same one), and for
char-level data nanoGPT's `meta.pkl`. The whole folder is staged and moved into place only when
complete, so a failed run never leaves a half-written dataset behind.

Every dataset (Shakespeare, OpenWebText, the user's files or Hub datasets; in characters, GPT-2
BPE or a BPE trained on the train split) goes through one pipeline, `prepare_corpus`: `datasets`
loads and splits them, worker processes encode batches of documents and write them straight to
chunk files, and the chunks are joined into the bins. Memory stays bounded by one batch per
worker, whatever the corpus size.

Not here: reading raw sources (gpt_train.sources), reading prepared datasets (gpt_train.data),
tokenizers themselves (gpt_train.tokenizer).
"""
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from gpt_train.cli import load_config
from gpt_train.config import check_choices, setting
from gpt_train.data import MAX_VOCAB, SPLITS, TOKEN_DTYPE
from gpt_train.errors import UserError
from gpt_train.files import atomic_path
from gpt_train.sources import load_source, loader_for, progress_bars

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SHAKESPEARE = os.path.join(REPO_ROOT, "data_prep", "tinyshakespeare", "input.txt")


def check_token_range(ids, what):
    top = int(np.max(ids)) if len(ids) else 0
    if top >= MAX_VOCAB:
        raise UserError(f"{what} holds token id {top}, which does not fit uint16 "
                        f"(max {MAX_VOCAB - 1}): use a vocabulary of at most {MAX_VOCAB:,} tokens")


def write_meta(out_dir, meta):
    """nanoGPT's meta.pkl (its char vocabulary), written whole or not at all."""
    with atomic_path(os.path.join(out_dir, "meta.pkl")) as tmp, open(tmp, "wb") as f:
        pickle.dump(meta, f)


# ---------------------------------------------------------------------------------------
# Corpora through `datasets`: load, split, tokenize in worker processes, write the bins.
# Every preparer (shakespeare_char, shakespeare, openwebtext, custom) is this one pipeline
# with different defaults.

OWT_VAL_FRACTION = 0.0005  # nanoGPT's held-out share of OpenWebText documents (~4M val tokens)
OWT_SPLIT_SEED = 2357  # nanoGPT's seed for that split: the same documents end up in val
DOCS_PER_BATCH = 1000  # documents per worker task: bounds worker memory whatever the corpus size
COPY_BUFFER = 16 * 1024 * 1024
SPLIT_MODES = ("auto", "documents", "tail")
TOKENIZERS = ("gpt2", "char", "bpe")
BPE_MIN_VOCAB = 257  # the 256 bytes and end-of-text: below that some text has no token
# Files a dataset folder may hold from an earlier preparation; stale ones are removed so a
# folder never mixes two tokenizers.
DATASET_FILES = ("train.bin", "val.bin", "train.mask.bin", "val.mask.bin", "meta.pkl", "tokenizer.json",
                 "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                 "chat_template.jinja")


@dataclass
class CorpusConfig:
    source: str = setting("", "local .txt, .json/.jsonl or .parquet files (comma-separated, globs "
                              "allowed) or a Hub dataset name")
    subset: str = setting("", "the Hub dataset's configuration, e.g. sample-10BT")
    name: str = setting("", "dataset name, written to data/<name>; empty means the source's name")
    out_dir: str = setting("", "output folder; empty means data/<name>")
    text_column: str = setting("text", "column holding the text (json, parquet, Hub datasets)")
    tokenizer: str = setting("gpt2", "'gpt2' (BPE, the id space of OpenAI's GPT-2), 'char' (one token per "
                                     "character) or 'bpe' (a byte-level BPE trained on the train split)",
                             choices=TOKENIZERS)
    tokenizer_from: str = setting("", "encode with this model's tokenizer instead (a model folder, gpt2* or a Hub "
                                      "id): data for fine-tuning that model, whatever its vocabulary")
    vocab_size: int = setting(8192, "tokenizer='bpe': tokens in the trained vocabulary, end-of-text included "
                                    "(257 to 65,536: ids must fit the uint16 bins)")
    val_fraction: float = setting(0.1, "share held out for validation")
    split_by: str = setting("auto", "'documents': a seeded random share of the documents (nanoGPT's "
                                    "openwebtext); 'tail': the end of each document (nanoGPT's shakespeare); "
                                    "'auto': tail for .txt files, documents otherwise", choices=SPLIT_MODES)
    seed: int = setting(OWT_SPLIT_SEED, "seed of the document split")
    append_eot: bool = setting(True, "end each document with <|endoftext|> (gpt2 and bpe)")
    num_proc: int = setting(max(1, (os.cpu_count() or 2) // 2), "worker processes for tokenizing")

    def validate(self):
        check_choices(self)
        if not self.source:
            raise UserError("no source given: pass --source=FILES or --source=HUB_DATASET_NAME")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.tokenizer == "bpe" and not BPE_MIN_VOCAB <= self.vocab_size <= MAX_VOCAB:
            raise UserError(f"vocab_size must be between {BPE_MIN_VOCAB} (the 256 bytes and end-of-text) and "
                            f"{MAX_VOCAB:,} (ids must fit the uint16 bins nanoGPT's format uses), "
                            f"got {self.vocab_size:,}")
        if self.num_proc < 1:
            raise UserError(f"num_proc must be at least 1, got {self.num_proc}")
        return self


def prepare_corpus(argv, cls=CorpusConfig):
    """Load, split, tokenize and write one dataset folder; the whole of every corpus preparer."""
    cfg = load_config(argv, cls)
    with progress_bars(cfg.source):
        return _prepare_corpus(cfg)


def _prepare_corpus(cfg):
    if cfg.tokenizer_from and "tokenizer" in cfg.explicit:
        raise UserError("tokenizer and tokenizer_from both given: tokenizer_from encodes with that model's "
                        "vocabulary, so drop --tokenizer")
    corpus, out_dir, files = load_source(cfg, "text_column")
    split_by = cfg.split_by if cfg.split_by != "auto" else ("tail" if files and loader_for(files) == "text"
                                                            else "documents")
    splits = _split(corpus, cfg, split_by)
    codec = _codec(cfg, splits)
    write_dataset(splits, codec, cfg.text_column, out_dir, cfg.num_proc,
                  append_eot=cfg.append_eot and codec.eot is not None)
    return out_dir


def _split(corpus, cfg, split_by):
    if split_by == "documents":
        if len(corpus) < 2:
            raise UserError(f"{cfg.source} holds {len(corpus)} document(s): a document split needs at least 2; "
                            "use --split_by=tail")
        parts = corpus.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, shuffle=True)
        return {"train": parts["train"], "val": parts["test"]}
    column, keep = cfg.text_column, 1.0 - cfg.val_fraction

    def cut(part):
        def fn(batch):
            texts = batch[column]
            return {column: [t[:int(len(t) * keep)] if part == "train" else t[int(len(t) * keep):] for t in texts]}
        return fn

    return {part: corpus.map(cut(part), batched=True, desc=f"taking the {part} part of each document")
            for part in SPLITS}


def _codec(cfg, splits):
    from gpt_train.tokenizer import BpeCodec, CharCodec, Gpt2Codec, ModelCodec  # deferred: imports transformers

    if cfg.tokenizer_from:
        from gpt_train.tokenizer import tokenizer_of

        codec = ModelCodec(tokenizer_of(cfg.tokenizer_from, "tokenizer_from"))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if cfg.num_proc > 1 else "true")  # as bpe's
        for part in splits.values():  # a char vocabulary has no unknown token: name what it lacks, and where
            codec.check_covers(part, cfg.text_column, cfg.tokenizer_from)
        return codec
    if cfg.tokenizer == "gpt2":
        return Gpt2Codec()
    if cfg.tokenizer == "bpe":  # learnt from train alone: val stays text the tokenizer has never seen
        train = splits["train"]
        batches = (batch[cfg.text_column] for batch in train.iter(batch_size=DOCS_PER_BATCH))
        codec = BpeCodec(cfg.vocab_size).train(batches, length=len(train))
        # encoding: `tokenizers` threads in one process, or one thread per forked worker (said
        # before the fork, so the workers do not each warn that they turned threads off)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if cfg.num_proc > 1 else "true")
        print(f"vocab size: {codec.vocab_size:,} (trained on the train split)")
        return codec
    chars = set()
    for part in splits.values():
        found = part.map(_distinct_chars, batched=True, batch_size=DOCS_PER_BATCH, input_columns=[cfg.text_column],
                         remove_columns=part.column_names, num_proc=_workers(cfg.num_proc, part),
                         desc="collecting characters")
        for text in found["chars"]:
            chars.update(text)
    codec = CharCodec(chars)
    print(f"vocab size: {codec.vocab_size:,}")
    if codec.vocab_size > MAX_VOCAB:
        raise UserError(f"{cfg.source} has {codec.vocab_size:,} distinct characters, more token ids than uint16 "
                        f"bins hold ({MAX_VOCAB:,}): use --tokenizer=gpt2")
    return codec


def _distinct_chars(texts):
    return {"chars": ["".join(set("".join(texts)))]}


def _workers(num_proc, part):
    return max(1, min(num_proc, len(part) // DOCS_PER_BATCH + 1)) if num_proc > 1 else None


class _EncodeToChunks:
    """The map function: encode a batch of documents and write it as one chunk file.

    Workers write their tokens straight to disk and hand back only a count: token lists
    never cross a process boundary or pass through Arrow, which is most of what nanoGPT's
    recipe spends its time on.
    """

    def __init__(self, codec, chunk_dir, append_eot):
        self.codec, self.chunk_dir, self.append_eot = codec, chunk_dir, append_eot

    def __call__(self, texts, indices):
        ids = self.codec.encode_batch(texts, self.append_eot)
        path = os.path.join(self.chunk_dir, f"{indices[0]:012d}.bin")
        check_token_range(ids, path)
        ids.astype(TOKEN_DTYPE).tofile(path)
        return {"tokens": [len(ids)]}


def write_dataset(splits, codec, text_column, out_dir, num_proc, append_eot):
    """Tokenize each split with `num_proc` workers and write the dataset folder.

    Everything is staged in a hidden folder inside out_dir and moved into place at the end,
    so an interrupted or failed run leaves an existing dataset as it was.
    """
    from datasets.utils.logging import is_progress_bar_enabled

    from gpt_train.tokenizer import save_tokenizer  # deferred with the codecs (see _codec)

    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging-") as staging:
        for split, part in splits.items():
            chunk_dir = os.path.join(staging, f"{split}-chunks")
            os.makedirs(chunk_dir)
            counts = part.map(_EncodeToChunks(codec, chunk_dir, append_eot), batched=True, batch_size=DOCS_PER_BATCH,
                              with_indices=True, input_columns=[text_column], remove_columns=part.column_names,
                              num_proc=_workers(num_proc, part), load_from_cache_file=False, keep_in_memory=True,
                              desc=f"tokenizing {split}")
            chunks = sorted(os.listdir(chunk_dir))  # zero-padded first document index: corpus order
            with open(os.path.join(staging, f"{split}.bin"), "wb") as out:
                shown = is_progress_bar_enabled()  # quiet for small corpora, as datasets' are
                for chunk in tqdm(chunks, desc=f"writing {split}.bin", unit="chunk", disable=not shown):
                    with open(os.path.join(chunk_dir, chunk), "rb") as f:
                        shutil.copyfileobj(f, out, COPY_BUFFER)
                    os.remove(os.path.join(chunk_dir, chunk))
            tokens = sum(counts["tokens"])
            if tokens <= (len(part) if append_eot else 0):  # only end-of-text markers, if anything
                raise UserError(f"the {split} split holds no text ({tokens} token(s)): give a corpus with text in "
                                "it, or a larger val_fraction if only val came out empty")
            print(f"{split} has {tokens:,} tokens")
        if hasattr(codec, "nanogpt_meta"):
            write_meta(staging, codec.nanogpt_meta())
        save_tokenizer(codec.tokenizer(), staging)
        commit_dataset(staging, out_dir)
    print(f"wrote {out_dir}")


def commit_dataset(staging, out_dir):
    """Move the staged files over the dataset folder and drop stale ones from an earlier run."""
    new = {n for n in os.listdir(staging) if os.path.isfile(os.path.join(staging, n))}
    for name in DATASET_FILES:
        if name not in new and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in sorted(new, key=lambda n: (n.endswith(".bin"), n.endswith(".mask.bin"), n)):  # bins, then masks, last
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))


@dataclass
class ShakespeareConfig(CorpusConfig):
    source: str = setting(TINY_SHAKESPEARE, "the text to encode")
    name: str = setting("shakespeare", "dataset name, written to data/<name>")
    split_by: str = setting("tail", "the last val_fraction of the text is val, as in nanoGPT")
    append_eot: bool = setting(False, "nanoGPT's Shakespeare has no end-of-text token")
    num_proc: int = setting(1, "one document: one worker")


@dataclass
class ShakespeareCharConfig(ShakespeareConfig):
    name: str = setting("shakespeare_char", "dataset name, written to data/<name>")
    tokenizer: str = setting("char", "one token per character, ids in the order of the sorted characters")


@dataclass
class OpenWebTextConfig(CorpusConfig):
    source: str = setting("openwebtext", "Hub dataset name, or local files with the same 'text' column")
    name: str = setting("openwebtext", "dataset name, written to data/<name>")
    val_fraction: float = setting(OWT_VAL_FRACTION, "share of the documents held out for validation")
    split_by: str = setting("documents", "a seeded random share of the documents is val, as in nanoGPT")


@dataclass
class FineWebEduConfig(OpenWebTextConfig):
    source: str = setting("HuggingFaceFW/fineweb-edu", "Hub dataset name, or local files with the same 'text' column")
    subset: str = setting("sample-10BT", "sample-10BT (~10B GPT-2 tokens), sample-100BT, sample-350BT, or a CC-MAIN "
                                         "dump")
    name: str = setting("fineweb_edu", "dataset name, written to data/<name>")


@dataclass
class FineWebConfig(FineWebEduConfig):
    source: str = setting("HuggingFaceFW/fineweb", "Hub dataset name, or local files with the same 'text' column")
    name: str = setting("fineweb", "dataset name, written to data/<name>")


# `gpt-prepare NAME [--key=value ...]` (gpt_train.commands): the data_prep scripts' work by dataset name.
PREPARERS = {"shakespeare_char": ShakespeareCharConfig, "shakespeare": ShakespeareConfig,
             "openwebtext": OpenWebTextConfig, "fineweb_edu": FineWebEduConfig, "fineweb": FineWebConfig,
             "custom": CorpusConfig}
