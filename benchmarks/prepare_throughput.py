"""Tokens per second of the OpenWebText preparer against nanoGPT's recipe, on a generated corpus,
and beside them the FineWeb-Edu preparer and training's stream (stream_from=).

Writes a corpus of `--mb` megabytes of JSON lines (documents of Shakespeare's words in random
order, lengths spread like web pages), loads it once so both methods start from the same
warm `datasets` cache, then runs each method in its own process, alternating, `--rounds`
times, at the same worker count:

  gpt-train  data_prep/openwebtext/prepare.py with --source=<corpus>: batched encoding in
             workers that write their tokens straight to chunk files; only counts come back.
  nanoGPT    its data/openwebtext/prepare.py recipe: per-document encode_ordinary inside
             map (token lists returned through Arrow), then 1024 shards concatenated into
             an np.memmap. Same BPE (tiktoken, the bundled GPT-2 files), same split.
  fineweb   data_prep/fineweb_edu/prepare.py with --source=<corpus>: must write the same bins.
  stream    stream_from=<corpus>: one process reading the corpus through datasets' streaming
            mode, tokenizing and packing it into GPT-2's 12 x 1024-token batches until it ends
            (no bins: what one training process gets from the stream, in tokens/s of one core).

Each timing runs from load_dataset to the last byte of val.bin. Both must write identical
bins. Peak memory is the largest resident set of any process of the run (main or worker),
measured at the full corpus and at half of it: it should not grow with the corpus.

    python benchmarks/prepare_throughput.py [--mb=50] [--num_proc=2] [--rounds=1]
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NANOGPT_WRITE_SHARDS = 1024  # nanoGPT's total_batches
MEAN_DOC_WORDS = 900  # ~5 KB of text per document, about OpenWebText's average
DOC_LENGTH_SIGMA = 0.8  # lognormal spread: many short pages, a few long ones


def generate_corpus(path, megabytes, seed=0):
    with open(os.path.join(ROOT, "data_prep", "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        words = np.array(f.read().split())
    rng = np.random.default_rng(seed)
    written, target = 0, megabytes * 1_000_000
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n = max(5, int(rng.lognormal(np.log(MEAN_DOC_WORDS), DOC_LENGTH_SIGMA)))
            line = json.dumps({"text": " ".join(rng.choice(words, n))}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    return path


def _encode_one(example):
    """nanoGPT's process(): one document's ids as a Python list, plus its length."""
    from gpt_train.tokenizer import GPT2_EOT_ID, gpt2_encoding
    ids = gpt2_encoding().encode_ordinary(example["text"])
    ids.append(GPT2_EOT_ID)
    return {"ids": ids, "len": len(ids)}


def nanogpt_recipe(corpus, out_dir, num_proc):
    from datasets import load_dataset
    from gpt_train.prepare import OWT_SPLIT_SEED, OWT_VAL_FRACTION

    split = load_dataset("json", data_files=corpus, split="train").train_test_split(
        test_size=OWT_VAL_FRACTION, seed=OWT_SPLIT_SEED, shuffle=True)
    split["val"] = split.pop("test")
    tokenized = split.map(_encode_one, remove_columns=["text"], num_proc=num_proc, load_from_cache_file=False,
                          desc="tokenizing the splits")
    os.makedirs(out_dir, exist_ok=True)
    for name, dset in tokenized.items():
        total = np.sum(dset["len"], dtype=np.uint64)
        arr = np.memmap(os.path.join(out_dir, f"{name}.bin"), dtype=np.uint16, mode="w+", shape=(total,))
        idx = 0
        shards = min(NANOGPT_WRITE_SHARDS, len(dset))  # our val split has fewer documents than 1024
        for i in range(shards):
            shard = dset.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
            ids = np.concatenate(shard["ids"])
            arr[idx:idx + len(ids)] = ids
            idx += len(ids)
        arr.flush()


def ours(corpus, out_dir, num_proc, preparer="OpenWebTextConfig"):
    from gpt_train import prepare
    prepare.prepare_corpus([f"--source={corpus}", f"--out_dir={out_dir}", f"--num_proc={num_proc}"],
                           getattr(prepare, preparer))


def fineweb(corpus, out_dir, num_proc):
    ours(corpus, out_dir, num_proc, "FineWebEduConfig")


def stream(corpus, out_dir, num_proc):
    """Every batch of the corpus, as one process of a streamed GPT-2 run takes them; writes the token
    count to out_dir/tokens."""
    from gpt_train.cli import load_config
    from gpt_train.stream import TokenStream
    from gpt_train.tokenizer import Gpt2Codec

    cfg = load_config([f"--stream_from={corpus}", "--out_dir=unused", "--stream_val_documents=10"])
    tokens = TokenStream(cfg, Gpt2Codec(), 0, 1, "cpu")
    steps = 0
    while tokens.iteration(1) is not None:
        steps += 1
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokens"), "w") as f:
        f.write(str(steps * cfg.batch_size * cfg.block_size))


def run_method(method, corpus, out_dir, num_proc, script=__file__, extra=()):
    """Run one method of `script` in a fresh process; (seconds, peak RSS MB of its largest process,
    tokens, bins digest)."""
    cmd = [sys.executable, script, f"--child={method}", f"--corpus={corpus}", f"--out={out_dir}",
           f"--num_proc={num_proc}", *extra]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            errors.seek(0)
            raise SystemExit(f"{method} failed:\n{errors.read()[-3000:]}")
    seconds = float(out.strip().splitlines()[-1])
    if os.path.exists(os.path.join(out_dir, "tokens")):  # the stream writes no bins, only its count
        with open(os.path.join(out_dir, "tokens")) as f:
            return seconds, usage.ru_maxrss / 1024, int(f.read()), None
    digest = hashlib.sha256()
    n_tokens = 0
    for split in ("train", "val"):
        with open(os.path.join(out_dir, f"{split}.bin"), "rb") as f:
            data = f.read()
        digest.update(data)
        n_tokens += len(data) // 2
    return seconds, usage.ru_maxrss / 1024, n_tokens, digest.hexdigest()


def child(method, corpus, out_dir, num_proc):
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    # Imports happen before the clock starts for both methods: a fixed cost, not throughput.
    import datasets  # noqa: F401
    import tiktoken  # noqa: F401
    import transformers  # noqa: F401

    import gpt_train.prepare  # noqa: F401
    import gpt_train.tokenizer  # noqa: F401
    start = time.perf_counter()
    import pyarrow  # noqa: F401
    {"nanogpt": nanogpt_recipe, "gpt-train": ours, "fineweb": fineweb, "stream": stream}[method](corpus, out_dir,
                                                                                               num_proc)
    print(time.perf_counter() - start)


def parse_arguments(description, **int_options):
    """The options of the prepare benchmarks (and of `int_options`, name=default); --child, --corpus
    and --out are how run_method starts one method in a fresh process."""
    ap = argparse.ArgumentParser(description=description)
    for name, default in {"mb": 50, "num_proc": 2, "rounds": 1, **int_options}.items():
        ap.add_argument(f"--{name}", type=int, default=default)
    for name in ("child", "corpus", "out"):
        ap.add_argument(f"--{name}")
    return ap.parse_args()


def main():
    a = parse_arguments(__doc__.split("\n")[0])
    if a.child:
        return child(a.child, a.corpus, a.out, a.num_proc)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "cache")
        from datasets import load_dataset
        sizes = {"full": a.mb, "half": a.mb // 2}
        corpora = {k: generate_corpus(os.path.join(tmp, f"{k}.jsonl"), mb) for k, mb in sizes.items()}
        for path in corpora.values():
            load_dataset("json", data_files=path, split="train")  # warm cache for both methods
        times = {"gpt-train": [], "nanogpt": [], "fineweb": [], "stream": []}
        tokens = {}
        peak = {}
        for r in range(a.rounds):
            for method in times:
                seconds, rss, n_tokens, digest = run_method(method, corpora["full"], os.path.join(tmp, method), a.num_proc)
                times[method].append(seconds)
                tokens[method] = n_tokens
                peak[(method, "full")] = rss
                print(f"round {r + 1} {method}: {seconds:.2f} s, {n_tokens / seconds / 1e6:.2f}M tokens/s, "
                      f"peak RSS {rss:.0f} MB" + (f", bins sha256 {digest[:12]}" if digest else ""), flush=True)
            digests = {m: run_digest(os.path.join(tmp, m)) for m in times if m != "stream"}
            assert len(set(digests.values())) == 1, "the two methods wrote different bins"
        for method in times:
            peak[(method, "half")] = run_method(method, corpora["half"], os.path.join(tmp, method + "-half"), a.num_proc)[1]
        n_tokens = tokens["gpt-train"]
        print(f"corpus: {sizes['full']} MB of JSON lines, {n_tokens:,} tokens; num_proc={a.num_proc} (the stream: "
              f"one process); {os.cpu_count()} CPUs visible")
        for method, ts in times.items():
            t = statistics.median(ts)
            print(f"{method:9s}: median {t:.2f} s, {tokens[method] / t / 1e6:.2f}M tokens/s, peak RSS "
                  f"{peak[(method, 'half')]:.0f} MB at {sizes['half']} MB, {peak[(method, 'full')]:.0f} MB at {sizes['full']} MB")
        print(f"speedup gpt-train over nanoGPT: {statistics.median(times['nanogpt']) / statistics.median(times['gpt-train']):.2f}x")


def run_digest(folder):
    digest = hashlib.sha256()
    for split in ("train", "val"):
        with open(os.path.join(folder, f"{split}.bin"), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


if __name__ == "__main__":
    main()
