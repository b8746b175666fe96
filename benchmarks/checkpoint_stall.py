"""How long a checkpoint stops training: GPT-2 124M's shape with its AdamW state, on CPU, each save
through the loop's own `save` (gpt_train.train.save), with async_save off and on, into a local
out_dir and into S3's API (moto's server on loopback, as in tests/test_store.py).

The stall is the time the loop spends in `save`; for async_save the time until the checkpoint is
committed (and, on S3, uploaded under its manifest) is printed beside it. Each case is its own run
(setup, one optimizer step so AdamW's state exists, then --saves saves of distinct iterations).

    python data_prep/shakespeare/prepare.py        # once: GPT-2 BPE tokens of Tiny Shakespeare
    python benchmarks/checkpoint_stall.py [--saves=2] [--data_dir=data/shakespeare] [--cases=local,s3]
"""
import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt_train.cli import load_config  # noqa: E402
from gpt_train.train import forward_loss, save, setup, train_batches  # noqa: E402

GPT2_124M = ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=64", "--batch_size=1",
             "--gradient_accumulation_steps=1", "--device=cpu", "--compile=False", "--dropout=0.0", "--eval_iters=1"]


def s3_endpoint():
    """S3's API on 127.0.0.1 (moto's server, in this process) and a bucket on it."""
    from moto.server import ThreadedMotoServer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}")
    import s3fs
    bucket = f"stall-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    return bucket


def stalls(out_dir, async_save, args):
    """[(seconds in save, seconds until committed)] for each save of one run."""
    run = setup(load_config([*GPT2_124M, f"--data_dir={args.data_dir}", f"--out_dir={out_dir}",
                             f"--async_save={async_save}", "--overwrite_output_dir=True"]))
    batches = train_batches(run)
    with run.accelerator.accumulate(run.model):
        run.accelerator.backward(forward_loss(run.model, *next(batches)))
    for optimizer in run.optimizers:
        optimizer.step()
    figures = []
    try:
        for i in range(args.saves):
            run.iter_num = i + 1
            t0 = time.perf_counter()
            save(run, val_loss=5.0 - i)
            stalled = time.perf_counter() - t0
            run.saver.wait()
            figures.append((stalled, time.perf_counter() - t0))
    finally:
        run.saver.close()
        if run.lock:
            run.lock.release()
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=2)
    parser.add_argument("--data_dir", default="data/shakespeare")
    parser.add_argument("--cases", default="local,s3")
    args = parser.parse_args()
    where = {}
    scratch = tempfile.mkdtemp(prefix="checkpoint-stall-")
    os.environ["GPT_TRAIN_CACHE"] = os.path.join(scratch, "cache")  # the S3 runs' working copies
    if "local" in args.cases:
        where["local disk"] = os.path.join(scratch, "out")
    if "s3" in args.cases:
        where["S3 (moto on loopback)"] = f"s3://{s3_endpoint()}/run"
    rows = []
    try:
        for name, out_dir in where.items():
            for async_save in (False, True):
                figures = stalls(out_dir, async_save, args)
                stall = statistics.median(f[0] for f in figures)
                done = statistics.median(f[1] for f in figures)
                rows.append((name, "async" if async_save else "sync", stall, done, [round(f[0], 2) for f in figures]))
                print(f"{name:24} {rows[-1][1]:6} stall {stall:6.2f} s   committed after {done:6.2f} s   "
                      f"each: {rows[-1][4]}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n| out_dir | save | training stall per save (median) | until committed |")
    print("| --- | --- | --- | --- |")
    for name, mode, stall, done, _ in rows:
        print(f"| {name} | {mode} | {stall:.2f} s | {done:.2f} s |")


if __name__ == "__main__":
    main()
