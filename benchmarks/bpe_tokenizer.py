"""Training and applying a BPE tokenizer: gpt-train's `--tokenizer=bpe` against plain `tokenizers` calls.

On a generated corpus of `--mb` megabytes of JSON lines (prepare_throughput's documents), each
method runs in its own process, alternating, `--rounds` times:

  gpt-train  data_prep/custom/prepare.py --tokenizer=bpe: the train split's documents stream
             into `tokenizers`' trainer in batches, then worker processes encode batches of
             documents and write their tokens straight to chunk files.
  tokenizers what one writes with the library alone: the same split (datasets, same seed), the
             train texts as one list into train_from_iterator, encode_batch over each split,
             the ids concatenated in memory and written with numpy.

Both train the same byte-level BPE (GPT-2 pre-tokenisation, --vocab_size with end-of-text) and
must write identical bins and merges. Each timing runs from load_dataset to the last byte of
val.bin; peak memory is the largest resident set of the run's processes.

    python benchmarks/bpe_tokenizer.py [--mb=50] [--vocab_size=8192] [--num_proc=2] [--rounds=1]
"""
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prepare_throughput import generate_corpus, parse_arguments, run_method  # noqa: E402

VAL_FRACTION, SEED = 0.01, 2357


def plain(corpus, out_dir, vocab_size, num_proc):
    from datasets import load_dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    parts = load_dataset("json", data_files=corpus, split="train").train_test_split(
        test_size=VAL_FRACTION, seed=SEED, shuffle=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(parts["train"]["text"], trainer)
    eot = tokenizer.get_vocab_size()
    os.makedirs(out_dir, exist_ok=True)
    for split, part in (("train", parts["train"]), ("val", parts["test"])):
        ids = [np.array(e.ids + [eot], dtype=np.uint16) for e in tokenizer.encode_batch(part["text"])]
        np.concatenate(ids).tofile(os.path.join(out_dir, f"{split}.bin"))
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))


def ours(corpus, out_dir, vocab_size, num_proc):
    from gpt_train.prepare import prepare_corpus
    prepare_corpus([f"--source={corpus}", f"--out_dir={out_dir}", "--tokenizer=bpe", f"--vocab_size={vocab_size}",
                    f"--val_fraction={VAL_FRACTION}", f"--seed={SEED}", f"--num_proc={num_proc}"])


def merges(out_dir):
    with open(os.path.join(out_dir, "tokenizer.json"), encoding="utf-8") as f:
        return json.load(f)["model"]["merges"]


def child(method, corpus, out_dir, vocab_size, num_proc):
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    import datasets  # noqa: F401  (imports before the clock, for both)
    import tokenizers  # noqa: F401
    import transformers  # noqa: F401

    import gpt_train.prepare  # noqa: F401
    import gpt_train.tokenizer  # noqa: F401
    start = time.perf_counter()
    {"tokenizers": plain, "gpt-train": ours}[method](corpus, out_dir, vocab_size, num_proc)
    print(time.perf_counter() - start)


def main():
    a = parse_arguments(__doc__.split("\n")[0], vocab_size=8192)
    if a.child:
        return child(a.child, a.corpus, a.out, a.vocab_size, a.num_proc)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "cache")
        from datasets import load_dataset
        corpus = generate_corpus(os.path.join(tmp, "corpus.jsonl"), a.mb)
        load_dataset("json", data_files=corpus, split="train")  # a warm cache for both
        times, peak = {"gpt-train": [], "tokenizers": []}, {}
        for r in range(a.rounds):
            digests = set()
            for method in times:
                out_dir = os.path.join(tmp, method)
                seconds, rss, n_tokens, digest = run_method(method, corpus, out_dir, a.num_proc, script=__file__,
                                                            extra=[f"--vocab_size={a.vocab_size}"])
                times[method].append(seconds)
                peak[method] = max(peak.get(method, 0), rss)
                digests.add(digest)
                print(f"round {r + 1} {method}: {seconds:.2f} s, peak RSS {rss:.0f} MB, {n_tokens:,} tokens, "
                      f"bins sha256 {digest[:12]}", flush=True)
            assert len(digests) == 1, "the two methods wrote different bins"
            assert merges(os.path.join(tmp, "gpt-train")) == merges(os.path.join(tmp, "tokenizers")), "other merges"
        print(f"corpus: {a.mb} MB of JSON lines, vocab_size {a.vocab_size:,}, num_proc={a.num_proc}, "
              f"{os.cpu_count()} CPUs visible")
        for method, ts in times.items():
            print(f"{method:10s}: median {statistics.median(ts):.2f} s, peak RSS {peak[method]:.0f} MB")
        ratio = statistics.median(times["gpt-train"]) / statistics.median(times["tokenizers"])
        print(f"time gpt-train / plain tokenizers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
