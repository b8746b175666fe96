"""LoRA against full fine-tuning, side by side in one run, on a CPU or whatever device is there.

A GPT-2-BPE model is trained here on Tiny Shakespeare (the "pretrained" model), then fine-tuned
on other text (this repository's README and Python sources) twice with the same
settings, once with finetune_method='full' and once with 'lora'. Each fine-tune runs in its own
process; reported: trainable parameters, the optimizer state saved (training_state/optimizer.bin),
the process's peak RSS, the median step time and the val loss after the same iterations. The two
fine-tunes alternate over --rounds.

    python benchmarks/lora_vs_full.py [--iters=200] [--rounds=1] [--n_layer=6 --n_embd=384]
"""
import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTLE_ITERS = 10  # steps left out of the median: allocator and caches warming up
COMMON = ["--device=auto", "--compile=False", "--dropout=0.0", "--log_interval=1", "--block_size=128",
          "--batch_size=8", "--gradient_accumulation_steps=1", "--warmup_iters=10", "--eval_iters=20"]


def run(args, log):
    """train.py in a child process that reports its own peak RSS (MiB) as its last line."""
    code = ("import resource, runpy, sys; sys.argv = ['train.py'] + sys.argv[1:]; "
            "runpy.run_path('train.py', run_name='__main__'); "
            "print('PEAK_RSS_MIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(result.stdout + result.stderr)
    if result.returncode:
        sys.exit(f"{args} failed, see {log}:\n{result.stderr[-2000:]}")
    return result.stdout


def fine_tune(method, base, data, out_dir, iters, lr):
    stdout = run([f"--init_from={base}", f"--data_dir={data}", f"--out_dir={out_dir}", *COMMON,
                  f"--finetune_method={method}", f"--max_iters={iters}", f"--lr_decay_iters={iters}",
                  f"--eval_interval={iters}", f"--learning_rate={lr}", f"--min_lr={lr / 10}"],
                 out_dir + ".log")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f]
    steps = [e["dt_ms"] for e in events if e["event"] == "train" and e["iter"] >= SETTLE_ITERS]
    lora = re.search(r"LoRA trains ([\d,]+) of", stdout)
    total = re.search(r"number of parameters: ([\d.]+)M", stdout)
    return {"trainable": int(lora.group(1).replace(",", "")) if lora else None, "params_m": float(total.group(1)),
            "peak_rss_mib": float(stdout.split("PEAK_RSS_MIB")[-1]), "step_ms": statistics.median(steps),
            "optimizer_mib": os.path.getsize(os.path.join(out_dir, "training_state", "optimizer.bin")) / 2 ** 20,
            "val_loss": [e["val/loss"] for e in events if e["event"] == "eval"][-1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=200, help="fine-tuning iterations of each method")
    ap.add_argument("--pretrain_iters", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--n_layer", type=int, default=6)
    ap.add_argument("--n_embd", type=int, default=384)
    ap.add_argument("--full_lr", type=float, default=1e-4)
    ap.add_argument("--lora_lr", type=float, default=1e-3)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="lora-vs-full-")
    shakespeare, other = os.path.join(tmp, "shakespeare"), os.path.join(tmp, "other")
    subprocess.run([sys.executable, "data_prep/shakespeare/prepare.py", f"--out_dir={shakespeare}"], cwd=ROOT,
                   check=True, capture_output=True)
    corpus = os.path.join(tmp, "repository.txt")  # the README and the Python sources, one text
    with open(corpus, "w", encoding="utf-8") as out:
        for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "gpt_train", "*.py")))]:
            with open(path, encoding="utf-8") as f:
                out.write(f.read() + "\n")
    subprocess.run([sys.executable, "data_prep/custom/prepare.py", f"--source={corpus}", f"--out_dir={other}",
                    "--val_fraction=0.1"], cwd=ROOT, check=True, capture_output=True)
    base = os.path.join(tmp, "base")
    run([f"--data_dir={shakespeare}", f"--out_dir={base}", *COMMON, f"--n_layer={a.n_layer}",
         f"--n_head={a.n_embd // 64}", f"--n_embd={a.n_embd}", f"--max_iters={a.pretrain_iters}",
         f"--lr_decay_iters={a.pretrain_iters}", f"--eval_interval={a.pretrain_iters}", "--learning_rate=1e-3",
         "--min_lr=1e-4"], base + ".log")
    results = {"full": [], "lora": []}
    for r in range(a.rounds):
        for method, lr in (("full", a.full_lr), ("lora", a.lora_lr)):
            results[method].append(fine_tune(method, base, other, os.path.join(tmp, f"{method}-{r}"), a.iters, lr))
            print(f"round {r + 1} {method}: {results[method][-1]}", flush=True)
    print(f"\n{a.n_layer} layers, {a.n_embd} wide, GPT-2 BPE; {a.iters} fine-tuning iterations of 8 x 128 tokens")
    print("| | trainable parameters | optimizer state | peak RSS | median step | val loss |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for method, rows in results.items():
        trainable = f"{rows[0]['trainable']:,}" if rows[0]["trainable"] else f"all ({rows[0]['params_m']}M)"
        print(f"| {method} (lr {a.full_lr if method == 'full' else a.lora_lr:g}) | {trainable} | "
              f"{rows[0]['optimizer_mib']:,.1f} MiB | "
              f"{statistics.median(r['peak_rss_mib'] for r in rows):,.0f} MiB | "
              f"{statistics.median(r['step_ms'] for r in rows):.1f} ms | "
              f"{statistics.median(r['val_loss'] for r in rows):.4f} |")
    full, lora = (statistics.median(r["step_ms"] for r in results[m]) for m in ("full", "lora"))
    print(f"step time lora/full: {lora / full:.3f}; files in {tmp}")


if __name__ == "__main__":
    main()
