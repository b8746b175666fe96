"""nanoGPT's CPU recipe on gpt-train against a plain-PyTorch loop, side by side in one run.

Runs the README's CPU command (train_shakespeare_char at 4 layers x 128 wide, context 64,
batch 12, 2000 iterations) through train.py, and the same architecture and schedule in
`reference_gpt.py` (no framework around the model), alternating them `--rounds` times so
drift on a shared machine hits both alike. Prints each run's median ms/iter (iterations 50
on, evaluation iterations included for gpt-train, so the ratio is if anything unfair to it)
and final val loss, then the ratio of medians.

    python data_prep/shakespeare_char/prepare.py
    python benchmarks/cpu_recipe.py [--iters=2000] [--rounds=1] [--reference=benchmarks/reference_gpt.py] [--data=data/shakespeare_char]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTLE_ITERS = 50  # the reference skips its first 50 steps too

RECIPE = ["configs/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
          "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
          "--n_embd=128", "--dropout=0.0"]


def run_gpt_train(iters, out_dir, data):
    cmd = [sys.executable, "train.py", *RECIPE, f"--max_iters={iters}", f"--lr_decay_iters={iters}",
           f"--out_dir={out_dir}", f"--data_dir={data}"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f]
    dts = [e["dt_ms"] for e in events if e["event"] == "train" and e["iter"] >= SETTLE_ITERS]
    val = [e["val/loss"] for e in events if e["event"] == "eval"][-1]
    return statistics.median(dts), val


def run_reference(reference, iters, data):
    out = subprocess.run([sys.executable, reference, "--data", data, "--iters", str(iters)],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    m = re.search(r"median ([\d.]+) ms/iter, val loss ([\d.]+)", out)
    return float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--reference", default=os.path.join(ROOT, "benchmarks", "reference_gpt.py"))
    ap.add_argument("--data", default="data/shakespeare_char", help="the prepared shakespeare_char folder")
    a = ap.parse_args()
    ours, theirs = [], []
    for r in range(a.rounds):
        with tempfile.TemporaryDirectory() as out_dir:
            ours.append(run_gpt_train(a.iters, out_dir, a.data))
        theirs.append(run_reference(a.reference, a.iters, a.data))
        print(f"round {r + 1}: gpt-train {ours[-1][0]:.2f} ms/iter (val {ours[-1][1]:.4f}), "
              f"reference {theirs[-1][0]:.2f} ms/iter (val {theirs[-1][1]:.4f})", flush=True)
    ms_ours = statistics.median(m for m, _ in ours)
    ms_ref = statistics.median(m for m, _ in theirs)
    print(f"gpt-train: median {ms_ours:.2f} ms/iter, val loss {ours[-1][1]:.4f} at iter {a.iters}")
    print(f"reference: median {ms_ref:.2f} ms/iter, val loss {theirs[-1][1]:.4f}")
    print(f"ratio gpt-train/reference: {ms_ours / ms_ref:.3f}")


if __name__ == "__main__":
    main()
