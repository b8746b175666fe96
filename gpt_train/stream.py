"""Training straight from a `datasets` stream (stream_from=): documents tokenized as they arrive
into the same (x, y) blocks the bins give, for corpora that do not fit the disk or that a run
should start on before any preparation.

Each process reads its own part of the stream (`split_dataset_by_node`: whole shards where the
shards divide evenly, every N-th document otherwise) and packs its documents, each ended with
end-of-text, into contiguous blocks, as the preparers write them. The first
`stream_val_documents` documents of the stream are the validation set, the same on every
process and never trained on (they are recognised by content, whichever shard holds them); the
next as many are the sample the "train" loss is estimated on. Both are tokenized once at the
start and evaluated through the BlockSampler as bins are. Training batches are tokenized by a
thread of each process, about two steps ahead of the loop.

A checkpoint saves each process's place: `IterableDataset.state_dict()` as of the last document
read, plus the tokens read but not yet trained on, in training_state/stream-<process>.json. A
resume loads them and reads on from there, so it trains on the batches the uninterrupted run
would have.

Not here: prepared bins (gpt_train.data), the loop that takes the batches (gpt_train.train).
"""
import hashlib
import itertools
import json
import os
import queue
import threading

import numpy as np
import torch

from gpt_train.data import BlockSampler, TokenBins, to_device
from gpt_train.errors import UserError, first_line
from gpt_train.out_dir import has_checkpoint
from gpt_train.sources import first_bad_file, load_data, loader_for, local_files

STATE_FILE = "stream-{process}.json"
DOCUMENTS_PER_READ = 16  # documents tokenized together: fewer calls, a small unread remainder to save
QUEUE_POLL_S = 0.1  # how soon a closed stream's producer notices


class HeldOutBins(TokenBins):
    """The stream's evaluation sample as in-memory bins: the BlockSampler reads them as files."""

    def __init__(self, name, arrays):
        super().__init__(name, {split: len(tokens) for split, tokens in arrays.items()}, None)
        self.arrays = arrays

    def memmap(self, split):
        return self.arrays[split]


def open_stream(cfg):
    """The stream cfg.stream_from names, its text column alone, or a one-line error."""
    try:
        stream = load_data(cfg.stream_from, cfg.stream_subset, local_files(cfg.stream_from), streaming=True)
        columns = stream.column_names or list(next(iter(stream), {}))  # some Hub streams name them only when read
    except UserError:
        raise
    except Exception as e:  # no network, an unknown id or subset, a malformed file: all end here
        files = local_files(cfg.stream_from)
        bad = files and first_bad_file(files, loader_for(files))
        if bad:
            raise UserError(f"could not stream {cfg.stream_from}: {bad}") from None
        raise UserError(f"could not stream {cfg.stream_from!r}{_subset(cfg)} ({first_line(e)}): check the name, the "
                        "subset and the network, or stream local files with --stream_from=PATH") from None
    if cfg.stream_text_column not in columns:
        raise UserError(f"{cfg.stream_from} has no column {cfg.stream_text_column!r} (columns: {', '.join(columns)}): "
                        "pass --stream_text_column=NAME")
    return stream.select_columns([cfg.stream_text_column])


def _more_sample(split, documents, val_documents):
    """What gives the held-out `split` more text, given a stream whose head held `documents`; '' if
    only a smaller block can help (the stream is that short)."""
    if split == "val" and documents > val_documents:
        return "raise stream_val_documents, or "
    if split == "train" and documents < 2 * val_documents and documents >= 2:  # val took what the sample lacks
        return f"lower stream_val_documents to at most {documents // 2:,} (the stream holds {documents:,}), or "
    if split == "train" and documents >= 2 * val_documents:
        return "raise stream_val_documents (the train sample is as many documents as val), or "
    return ""


def _take(cfg, documents, count):
    """The texts of the next `count` documents, or a one-line error naming what is unreadable in the
    files (bytes that are not UTF-8, a line that is no JSON), at the start or mid-run."""
    try:
        return [doc[cfg.stream_text_column] for doc in itertools.islice(documents, count)]
    except Exception as e:
        files = local_files(cfg.stream_from)
        why = (files and first_bad_file(files, loader_for(files))) or first_line(e)
        after = (f"; the last checkpoint in {cfg.out_dir} is intact: resume it then with --init_from=resume "
                 "--stream_allow_changed=True" if has_checkpoint(cfg.out_dir) else "")
        raise UserError(f"could not read {cfg.stream_from}: {why}: fix or leave out that file{after}") from None


def _subset(cfg):
    return f" (subset {cfg.stream_subset!r})" if cfg.stream_subset else ""


class TokenStream:
    """This process's training micro-batches from the stream, an optimizer step at a time."""

    def __init__(self, cfg, codec, process, processes, device):
        self.cfg, self.codec, self.device = cfg, codec, torch.device(device)
        self.process, self.processes = process, processes
        self.rows, self.block_size = cfg.batch_size, cfg.block_size
        head = _take(cfg, iter(open_stream(cfg)), 2 * cfg.stream_val_documents)
        val, sample = head[:cfg.stream_val_documents], head[cfg.stream_val_documents:]
        self.held_out = {_digest(text) for text in val}
        self.eval_bins = HeldOutBins(cfg.stream_from, {"val": self._encode(val), "train": self._encode(sample)})
        for split, tokens in self.eval_bins.arrays.items():
            if len(tokens) < cfg.block_size + 1:
                raise UserError(f"the stream's {split} sample ({len(tokens):,} tokens of the first {len(head):,} "
                                f"documents) is shorter than block_size+1 = {cfg.block_size + 1}: "
                                f"{_more_sample(split, len(head), cfg.stream_val_documents)}lower block_size")
        self.epoch, self.tokens = 0, np.zeros(0, dtype=np.int64)
        self.source = source_fingerprint(cfg.stream_from)  # a resume must read the files this run read
        self._open(None)
        self._state = self._last = self._snapshot()
        self._thread, self._queue, self._closed = None, None, threading.Event()

    def _open(self, dataset_state):
        from datasets.distributed import split_dataset_by_node

        self.dataset = split_dataset_by_node(open_stream(self.cfg), rank=self.process, world_size=self.processes)
        if dataset_state is not None:
            self.dataset.load_state_dict(dataset_state)
        self.documents = iter(self.dataset)

    def _encode(self, texts):
        return self.codec.encode_batch(texts, self.codec.eot is not None).astype(np.int64)

    def _read(self):
        """Tokenize the next few documents onto self.tokens; False at the end of the stream."""
        texts = _take(self.cfg, self.documents, DOCUMENTS_PER_READ)
        if not texts:
            return False
        texts = [text for text in texts if _digest(text) not in self.held_out]
        if texts:
            self.tokens = np.concatenate([self.tokens, self._encode(texts)])
        return True

    def _next_batch(self):
        """One (x, y) micro-batch off the stream, or None at its end (with stream_repeat=True it starts
        over instead). Only the producer thread calls it once that runs."""
        tokens, epoch_started = self.rows * self.block_size, self.epoch
        while len(self.tokens) < tokens + 1:
            if self._read():
                continue
            if not self.cfg.stream_repeat:
                return None
            if self.epoch > epoch_started:  # a whole pass added too little: it never will
                raise UserError(f"process {self.process}'s part of {self.cfg.stream_from} holds too little text for "
                                "one micro-batch: stream more documents or use fewer processes")
            self.epoch += 1
            self._open(None)
        rows, self.tokens = torch.from_numpy(self.tokens[:tokens + 1]), self.tokens[tokens:]
        return rows[:-1].view(self.rows, self.block_size), rows[1:].view(self.rows, self.block_size)

    def _snapshot(self):
        # state_dict() is a copy already; the tokens array is only ever replaced, never written to
        return {"epoch": self.epoch, "dataset": self.dataset.state_dict(), "tokens": self.tokens,
                "source": self.source}

    def _produce(self):
        """The producer thread: micro-batches into the queue, each with the stream's place after it,
        until the stream ends or the run closes it. Tokenizing (tiktoken, tokenizers) releases the
        GIL, so it runs beside the loop instead of between its steps."""
        try:
            while not self._closed.is_set():
                batch = self._next_batch()
                self._put((batch, self._snapshot() if batch else None))
                if batch is None:
                    return
        except BaseException as e:  # raised in the loop's thread, where it can stop the run
            self._put((e, None))

    def _put(self, item):
        while not self._closed.is_set():
            try:
                return self._queue.put(item, timeout=QUEUE_POLL_S)
            except queue.Full:
                continue

    def iteration(self, micro_steps):
        """This process's (x, y) micro-batches for one optimizer step, or None where the stream ended
        first. A producer thread keeps about two steps' batches ready."""
        if self._thread is None:
            self._queue = queue.Queue(maxsize=2 * micro_steps)
            self._thread = threading.Thread(target=self._produce, name="gpt-train stream", daemon=True)
            self._thread.start()
        self._state = self._last  # the place before this step's first batch
        batches = []
        for _ in range(micro_steps):
            batch, after = self._queue.get()
            if isinstance(batch, BaseException):
                raise batch
            if batch is None:
                self._queue.put((None, None))  # the end stays the end for a later call
                return None
            self._last = after
            batches.append(tuple(to_device(t, self.device) for t in batch))
        return batches

    def state(self):
        """This process's place as of the start of the step last taken (the loop reads one ahead),
        as JSON."""
        return {**self._state, "tokens": self._state["tokens"].tolist()}

    def load_state(self, state, where):
        """The place `state` (read from the checkpoint in `where`) holds, if the source is the one it was
        saved from (or stream_allow_changed says to go on anyway)."""
        assert self._thread is None, "the stream's place is restored before it starts"
        change = _changed(state.get("source"), self.source)  # checkpoints from before it was recorded: None
        if change and not self.cfg.stream_allow_changed:
            raise UserError(f"{self.cfg.stream_from} changed since the checkpoint in {where} was saved ({change}): "
                            "a resume would train on other data than the uninterrupted run. Restore the files it "
                            "read, or resume anyway with --stream_allow_changed=True")
        self.epoch, self.tokens = state["epoch"], np.array(state["tokens"], dtype=np.int64)
        self._open(state["dataset"])
        self._state = self._last = self._snapshot()

    def close(self):
        """Stop the producer thread (the run is over): it would hold the stream open."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()


class StreamData:
    """The stream as a run's training data (gpt_train.data's TrainingData): training batches from
    this process's part of the stream, evaluation batches from its held-out head."""

    def __init__(self, cfg, folder, processes):
        self.name = cfg.stream_from
        self.stream = TokenStream(cfg, stream_codec(cfg, folder), processes.process_index, processes.num_processes,
                                  processes.device)
        self.tokenizer = self.stream.codec.tokenizer()
        self.sampler = BlockSampler(self.stream.eval_bins, cfg.block_size, cfg.batch_size, cfg.seed, processes.device)

    def batches(self, accelerator, iteration, micro_steps):
        """A whole step's micro-batches at a time, ending at the first step some process's part of the
        stream cannot fill (stream_repeat=False)."""
        while True:
            batches = self.stream.iteration(micro_steps)
            ended = batches is None
            if accelerator.num_processes > 1:
                ended = bool(accelerator.reduce(torch.tensor(int(ended), device=accelerator.device),
                                                reduction="sum").item())
            if ended:
                return
            yield from ((x, y, None) for x, y in batches)

    def ended(self, iteration, max_iters):
        return (f"{self.name} ended: stopped after iteration {iteration - 1} of {max_iters} "
                "(stream_repeat=True starts it over instead)")

    def retokenize(self, where):
        return f"stream with the model's tokenizer (drop --tokenizer, or --tokenizer={where})"

    def save_state(self, folder):
        save_state(self.stream, folder)

    def load_state(self, folder):
        load_state(self.stream, folder)

    def close(self):
        self.stream.close()


def stream_codec(cfg, folder):
    """The stream's tokenizer as a codec: `tokenizer` (a model folder or Hub id), else the model's
    (init_from's folder), else GPT-2's; GPT-2's own through tiktoken, as the preparers encode it."""
    from gpt_train.tokenizer import Gpt2Codec, ModelCodec, is_gpt2_bpe, model_tokenizer, tokenizer_of

    if cfg.tokenizer:
        tokenizer = tokenizer_of(cfg.tokenizer, "tokenizer")
    else:
        tokenizer = model_tokenizer(folder) if folder else None
    return Gpt2Codec() if tokenizer is None or is_gpt2_bpe(tokenizer) else ModelCodec(tokenizer)


def save_state(stream, folder):
    path = os.path.join(folder, STATE_FILE.format(process=stream.process))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stream.state(), f)


def load_state(stream, folder):
    """Restore the stream's place from a checkpoint's training state, or a one-line error."""
    saved = sorted(name for name in os.listdir(folder) if name.startswith("stream-") and name.endswith(".json"))
    if len(saved) != stream.processes:
        raise UserError(f"{folder} holds the stream positions of {len(saved)} process(es), not {stream.processes}: "
                        f"resume a streamed run with the processes it was saved with ({len(saved)})")
    with open(os.path.join(folder, STATE_FILE.format(process=stream.process)), encoding="utf-8") as f:
        stream.load_state(json.load(f), os.path.dirname(folder))


def source_fingerprint(stream_from):
    """{file: {bytes, sha256}} of the local files a stream reads (None for a Hub dataset, which the
    Hub versions): what a resume compares to refuse data that changed under the run."""
    files = local_files(stream_from)
    if not files:
        return None
    fingerprint = {}
    for path in files:
        with open(path, "rb") as f:
            fingerprint[path] = {"bytes": os.path.getsize(path), "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    return fingerprint


def _changed(saved, now):
    """What differs between two fingerprints, in a few words, or None."""
    if saved is None or saved == now:
        return None
    now = now or {}
    for path in sorted(set(saved) | set(now)):
        if path not in now:
            return f"{path} is gone"
        if path not in saved:
            return f"{path} was not part of it"
        if saved[path]["bytes"] != now[path]["bytes"]:
            return f"{path} had {saved[path]['bytes']:,} bytes, now {now[path]['bytes']:,}"
        if saved[path]["sha256"] != now[path]["sha256"]:
            return f"{path} has the same size but other contents"
    return None


def _digest(text):
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
