"""gpt-train against nanoGPT's own train.py, one after the other on the same GPU and the same bins.

Each run is a real process on each side for a few iterations: nanoGPT's train.py, and
gpt-train's training loop through bench.py (`fit` itself, saving nothing: a gpt2-xl checkpoint is
19 GB) or, for the muon case, whose val loss counts, train.py. The figures are read off their
identical log lines (`iter N: loss L, time T ms`): the median step of the iterations after
`--warmup` (compilation, the evaluation at iteration 0 and allocator warm-up out), the tokens
per second that makes, and the peak GPU memory torch allocated (benchmarks/peak_memory.py wraps
both scripts). A gpt-train variant's losses are compared with the case's first gpt-train run:
where only a speed lever differs (chunked_loss) the batches are the same and the largest
difference says whether the lever changed the training; a different split of the micro-batches
(24 x 20) draws other batches, and Muon is another optimizer.

Cases (the issue's goals; docs/gpu.md has the figures):
  gpt2   GPT-2 124M at train_gpt2's 491,520 tokens per iteration (12 x 40 x 1024), bf16, compiled
  xl     gpt2-xl's shape at finetune_shakespeare's settings, random weights (the Hub is not
         reachable from the device), eager on both sides: peak memory and tokens/s
  muon   train_gpt2_muon against train_gpt2 (AdamW) on the same Shakespeare tokens: step time
         and the val loss after the same steps

    python benchmarks/side_by_side.py --case=gpt2 --nanogpt=.carry/nanoGPT [--iters=12]
    python benchmarks/side_by_side.py --case=xl --small     # a CPU smoke run at toy size
"""
import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK = os.path.join(ROOT, "benchmarks", "peak_memory.py")
STEP = re.compile(r"^iter (\d+): loss ([\d.]+|nan|inf), time ([\d.]+)ms", re.MULTILINE)
PEAK_LINE = re.compile(r"^peak_memory_bytes (\d+)$", re.MULTILINE)
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2",
        "--gradient_accumulation_steps=2", "--device=cpu", "--compile=False", "--dtype=float32"]

# (name, side, script or preset, settings); side 'nanogpt' runs nanoGPT's train.py with its config
XL_SHAPE = ["--init_from=scratch", "--n_layer=48", "--n_head=25", "--n_embd=1600", "--bias=True", "--compile=False",
            "--gradient_accumulation_steps=8"]
CASES = {
    "gpt2": [
        ("nanoGPT train.py", "nanogpt", "config/train_gpt2.py", ["--dataset=shakespeare"]),
        ("gpt-train", "gpt-train", "configs/train_gpt2.py", ["--dataset=shakespeare"]),
        ("gpt-train chunked loss", "gpt-train", "configs/train_gpt2.py", ["--dataset=shakespeare",
                                                                            "--chunked_loss=True"]),
        ("gpt-train 24x20 chunked", "gpt-train", "configs/train_gpt2.py",
         ["--dataset=shakespeare", "--chunked_loss=True", "--batch_size=24", "--gradient_accumulation_steps=20"]),
    ],
    "xl": [
        ("nanoGPT train.py", "nanogpt", "config/finetune_shakespeare.py", XL_SHAPE),
        ("gpt-train", "gpt-train", "configs/finetune_shakespeare.py", XL_SHAPE),
        ("gpt-train chunked loss", "gpt-train", "configs/finetune_shakespeare.py",
         [*XL_SHAPE, "--chunked_loss=True"]),
    ],
    "muon": [
        ("gpt-train AdamW (train_gpt2)", "gpt-train", "configs/train_gpt2.py", []),
        ("gpt-train Muon (train_gpt2_muon)", "gpt-train", "configs/train_gpt2_muon.py", []),
    ],
}
# the muon case trains long enough to compare losses: 49,152 tokens per step, a schedule of the
# run's length (warmup a sixth, Muon's cooldown a third), the same for both
MUON_STEPS = ["--dataset=shakespeare", "--gradient_accumulation_steps=4", "--min_lr=0"]


def nanogpt_workdir(nanogpt, work, datasets):
    """A folder that looks like a nanoGPT checkout whose data/<name> are our bins (the same format)."""
    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    for name in os.listdir(nanogpt):  # it reads configurator.py, config/ and data/ from the working directory
        if name not in ("data", ".git") and not os.path.exists(os.path.join(work, name)):
            os.symlink(os.path.join(os.path.abspath(nanogpt), name), os.path.join(work, name))
    for name, path in datasets.items():
        link = os.path.join(work, "data", name)
        if not os.path.exists(link):
            os.symlink(os.path.abspath(path), link)
    return work


def command(side, script, settings, iters, eval_iters, out_dir, small, saves):
    common = [f"--max_iters={iters}", f"--eval_iters={eval_iters}", "--log_interval=1", "--wandb_log=False",
              "--always_save_checkpoint=False", f"--out_dir={out_dir}", *settings, *(TINY if small else [])]
    if side == "nanogpt":  # nanoGPT evaluates at 0 and at each multiple: none after 0; it runs max_iters + 1
        return [sys.executable, PEAK, "train.py", script, f"--eval_interval={iters + 1}", *common]
    if not saves:  # bench.py runs fit for bench_warmup + bench_iters iterations and saves nothing
        return [sys.executable, PEAK, "bench.py", script, "--bench_warmup=0", f"--bench_iters={iters}", *common]
    return [sys.executable, PEAK, "train.py", script, f"--eval_interval={iters}", *common]


def run(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    steps = [(int(i), float(loss), float(ms)) for i, loss, ms in STEP.findall(result.stdout)]
    peak = PEAK_LINE.search(result.stdout)
    return steps, int(peak.group(1)) if peak else None, result.stdout


def tokens_per_iter(side, script, settings, cwd):
    """From the run's own settings: gpt-train's loader, or nanoGPT's config file and overrides."""
    values = {}
    for arg in settings:
        key, _, value = arg[2:].partition("=")
        values[key] = value
    if side == "gpt-train":
        sys.path.insert(0, ROOT)
        from gpt_train.cli import load_config
        cfg = load_config([script, *settings, "--out_dir=never-written"])
        return cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size
    config = {"batch_size": 12, "gradient_accumulation_steps": 40, "block_size": 1024}  # train.py's defaults
    exec(open(os.path.join(cwd, script)).read(), {}, config)  # nanoGPT's own config file, as it reads it
    config.update({k: int(v) for k, v in values.items() if k in ("batch_size", "gradient_accumulation_steps",
                                                                   "block_size")})
    return config["batch_size"] * config["gradient_accumulation_steps"] * config["block_size"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), required=True)
    ap.add_argument("--nanogpt", help="a nanoGPT checkout (benchmarks/gpu_carry.sh puts one in .carry/nanoGPT); "
                                      "without it the nanoGPT rows are left out")
    ap.add_argument("--iters", type=int, default=12, help="iterations of each run (muon: 60)")
    ap.add_argument("--warmup", type=int, default=3, help="first iterations left out of the median")
    ap.add_argument("--eval_iters", type=int, default=5)
    ap.add_argument("--data", default="data/shakespeare", help="GPT-2 BPE bins (data_prep/shakespeare/prepare.py)")
    ap.add_argument("--small", action="store_true", help="toy sizes on CPU: a smoke run of this script")
    ap.add_argument("--only", default="", help="comma-separated names of the runs to make (default: all of the case)")
    a = ap.parse_args()
    data = os.path.abspath(os.path.join(ROOT, a.data))
    if not os.path.exists(os.path.join(data, "train.bin")):
        sys.exit(f"no {data}/train.bin: python data_prep/shakespeare/prepare.py first")
    iters = a.iters if a.case != "muon" or a.small else max(a.iters, 60)
    rows, baseline = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, side, script, settings) in enumerate(CASES[a.case]):
            if a.only and name not in a.only.split(","):
                continue
            if side == "nanogpt" and not a.nanogpt:
                print(f"{name}: skipped (no --nanogpt checkout)", flush=True)
                continue
            if a.case == "muon":
                settings = [*settings, *MUON_STEPS, f"--lr_decay_iters={iters}", f"--warmup_iters={iters // 6}",
                            f"--cooldown_iters={iters // 3}"]
            if side == "nanogpt":
                cwd = nanogpt_workdir(a.nanogpt, os.path.join(tmp, "nanogpt"), {"shakespeare": data})
            else:
                cwd, settings = ROOT, [*settings, f"--data_dir={data}"]
            out_dir = os.path.join(tmp, f"out{i}")
            cmd = command(side, script, settings, iters, a.eval_iters, out_dir, a.small, saves=a.case == "muon")
            steps, peak, log = run(cmd, cwd)
            shutil.rmtree(out_dir, ignore_errors=True)  # the disk for the next run
            timed = [ms for it, _, ms in steps if it >= a.warmup]
            if not timed:
                raise SystemExit(f"{name}: no timed iterations in its log:\n{log[-2000:]}")
            ms = statistics.median(timed)
            tokens = tokens_per_iter(side, script, [*settings, *(TINY if a.small else [])], cwd)
            val = re.findall(r"val loss ([\d.]+)", log)
            row = {"name": name, "side": side, "ms": ms, "tokens_per_s": tokens / ms * 1000, "peak": peak,
                   "losses": [loss for _, loss, _ in steps],
                   "val": float(val[-1]) if val and side == "gpt-train" else None}  # nanoGPT: only at 0
            rows.append(row)
            if side == "gpt-train" and baseline is None:
                baseline = row
            print(f"{name}: {ms:,.1f} ms/iter (median of {len(timed)}), {row['tokens_per_s']:,.0f} tokens/s"
                  + (f", peak {peak / 2 ** 30:,.2f} GiB" if peak else "") + f"  [{shlex.join(cmd[2:])}]", flush=True)
    nano = next((r for r in rows if r["side"] == "nanogpt"), None)
    print(f"\n| {a.case}: run | ms/iter | tokens/s | vs nanoGPT | peak GiB | max loss diff vs gpt-train | val loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / nano['tokens_per_s']:.3f}x" if nano else "n/a"
        peak = f"{r['peak'] / 2 ** 30:,.2f}" if r["peak"] else "n/a"
        diff = "-"
        if r["side"] == "gpt-train" and r is not baseline:
            diff = f"{max(abs(x - y) for x, y in zip(r['losses'], baseline['losses'])):.4f}"
        val = f"{r['val']:.4f}" if r["val"] is not None else "-"
        print(f"| {r['name']} | {r['ms']:,.1f} | {r['tokens_per_s']:,.0f} | {ratio} | {peak} | {diff} | {val} |")

if __name__ == "__main__":
    main()
