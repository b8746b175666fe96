"""Time to target: how long `python train.py PRESET` takes to exit with a model as good as
nanoGPT's CPU recipe makes, the fast preset against the recipe side by side in one run.

The target is nanoGPT's own result for its README's CPU command (4 layers, 4 heads, 128 wide,
context 64, Tiny Shakespeare characters, 2000 iterations): val loss 1.9021 over 500 val batches.
Each run is timed from process start to exit (start-up, evaluations, checkpoints and the loss
chart included, as a user waits for it), then every final model is scored on the same 500 val
batches (fixed offsets, batch 12 x 64). Runs alternate (recipe, then each seed of the fast
preset, round after round) so drift on a shared machine hits both alike; time it on an
otherwise idle machine.

On a GPU (--gpu) the yardstick is nanoGPT's own GPU run instead: its train.py with
config/train_shakespeare_char.py (6 layers, 384 wide, context 256, 5000 iterations, compiled),
from a nanoGPT checkout (--nanogpt), is the baseline, and its best checkpoint's score in the same
run is the target; the fast preset is configs/speedrun_shakespeare_char.py, the recipe
gpt-train's train_shakespeare_char.py; scoring is over 500 batches of 12 x 256.

    python data_prep/shakespeare_char/prepare.py
    python benchmarks/time_to_target.py [--seeds=1337,1,2] [--rounds=1] [--nanogpt=PATH/TO/nanoGPT]
        [--fast=configs/speedrun_shakespeare_char_cpu.py] [--extra="--key=value ..."]
    python benchmarks/time_to_target.py --gpu --nanogpt=.carry/nanoGPT [--skip_recipe]
"""
import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.side_by_side import nanogpt_workdir  # noqa: E402

TARGET = 1.9021  # nanoGPT's CPU recipe, its 2000-iteration checkpoint over 500 val batches
RECIPE = "configs/train_shakespeare_char_cpu.py"  # nanoGPT's CPU command as a gpt-train preset
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
SCORE_BATCHES, SCORE_BATCH, SCORE_SEED = 500, 12, 0
# (recipe, fast preset, nanoGPT's command, fixed target or None for nanoGPT's score, scoring context)
MODES = {"cpu": (RECIPE, "configs/speedrun_shakespeare_char_cpu.py", NANOGPT_CPU, TARGET, 64),
         "gpu": ("configs/train_shakespeare_char.py", "configs/speedrun_shakespeare_char.py",
                 ["config/train_shakespeare_char.py"], None, 256)}


def timed(cmd, cwd):
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return seconds


def run_gpt_train(preset, out_dir, data, extra):
    cmd = [sys.executable, "train.py", preset, f"--out_dir={out_dir}", f"--data_dir={data}", *extra]
    return timed(cmd, ROOT), out_dir


def run_nanogpt(nanogpt, work, data, command, extra):
    """nanoGPT's train.py as its README runs it on a CPU (from a folder like its checkout, whose
    data/shakespeare_char is ours: the same bins); its ckpt.pt converted for scoring."""
    nanogpt_workdir(nanogpt, work, {"shakespeare_char": data})
    out = os.path.join(work, "out")
    cmd = [sys.executable, "train.py", *command, f"--out_dir={out}", *extra]
    seconds = timed(cmd, work)
    folder = os.path.join(work, "hf")
    timed([sys.executable, "-m", "gpt_train.convert", "from-nanogpt", os.path.join(out, "ckpt.pt"), folder,
           f"--meta={data}"], ROOT)
    return seconds, folder


@torch.no_grad()
def score(folder, data, block):
    """Mean loss of the model in `folder` over the same SCORE_BATCHES val batches for every model."""
    from transformers import GPT2LMHeadModel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPT2LMHeadModel.from_pretrained(folder).to(device).eval()
    block = min(block, model.config.n_positions)  # a smoke run's toy models
    model.loss_type = "ForCausalLM"  # the class name does not say so, and transformers warns
    val = np.memmap(os.path.join(data, "val.bin"), dtype=np.uint16, mode="r")
    rng = np.random.default_rng(SCORE_SEED)
    total = 0.0
    for _ in range(SCORE_BATCHES):
        starts = rng.integers(0, len(val) - block - 1, SCORE_BATCH)
        rows = torch.from_numpy(np.stack([val[i:i + block + 1] for i in starts]).astype(np.int64)).to(device)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        total += model(input_ids=x, labels=y, shift_labels=y).loss.item()
    return total / SCORE_BATCHES


def spread(values):
    return f"{statistics.mean(values):.4g} (min {min(values):.4g}, max {max(values):.4g})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU models and nanoGPT's GPU run as the target")
    ap.add_argument("--target", type=float, help="the val loss to reach, instead of the mode's (GPU: nanoGPT's "
                                                 "score from an earlier run, so it is not run again)")
    ap.add_argument("--fast", help="the fast preset (default: the mode's speedrun preset)")
    ap.add_argument("--seeds", default="1337,1,2", help="seeds of the fast preset (the recipe keeps its own)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--data", default="data/shakespeare_char")
    ap.add_argument("--nanogpt", help="a nanoGPT checkout: also time its own train.py")
    ap.add_argument("--extra", default="", help="settings appended to the fast preset's command (ablations)")
    ap.add_argument("--baseline_extra", default="", help="settings appended to the recipe's and nanoGPT's commands "
                                                         "(a smoke run's sizes)")
    ap.add_argument("--skip_recipe", action="store_true", help="time the fast preset only (exploring)")
    a = ap.parse_args()
    recipe, fast_preset, nanogpt_command, target, block = MODES["gpu" if a.gpu else "cpu"]
    a.fast = a.fast or fast_preset
    target = a.target or target
    if target is None and not a.nanogpt:
        ap.error("--gpu needs --nanogpt (its run is the target) or --target")
    baseline_extra = shlex.split(a.baseline_extra)
    data = os.path.abspath(os.path.join(ROOT, a.data) if not os.path.isabs(a.data) else a.data)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    runs = []  # (name, seed, seconds, folder)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            if not a.skip_recipe:
                seconds, folder = run_gpt_train(recipe, os.path.join(tmp, f"recipe-{r}"), data, baseline_extra)
                runs.append(("recipe", 1337, seconds, folder))
                print(f"round {r + 1} recipe: {seconds:.1f} s", flush=True)
            if a.nanogpt and (not a.skip_recipe or (a.gpu and not a.target)):
                seconds, folder = run_nanogpt(a.nanogpt, os.path.join(tmp, f"nanogpt-{r}"), data, nanogpt_command,
                                              baseline_extra)
                runs.append(("nanoGPT", 1337, seconds, folder))
                print(f"round {r + 1} nanoGPT: {seconds:.1f} s", flush=True)
            for seed in seeds:
                extra = [f"--seed={seed}", *shlex.split(a.extra)]
                seconds, folder = run_gpt_train(a.fast, os.path.join(tmp, f"fast-{seed}-{r}"), data, extra)
                runs.append(("fast", seed, seconds, folder))
                print(f"round {r + 1} fast seed {seed}: {seconds:.1f} s", flush=True)
        scored = [(name, seed, seconds, score(folder, data, block)) for name, seed, seconds, folder in runs]
    if target is None:  # nanoGPT's own run in this one
        target = statistics.mean(v for n, _, _, v in scored if n == "nanoGPT")
    print(f"\n{'run':8s} {'seed':>5s} {'wall s':>7s} {'val (500)':>9s}")
    for name, seed, seconds, loss in scored:
        print(f"{name:8s} {seed:5d} {seconds:7.1f} {loss:9.4f}{'' if loss <= target else '  above target'}")
    fast = [(s, v) for n, _, s, v in scored if n == "fast"]
    print(f"\nfast preset {a.fast} {a.extra}: wall {spread([s for s, _ in fast])} s, "
          f"val {spread([v for _, v in fast])}; target {target:.4f} met by "
          f"{sum(v <= target for _, v in fast)}/{len(fast)}")
    for baseline in ("recipe", "nanoGPT"):
        base = [s for n, _, s, _ in scored if n == baseline]
        if base:
            vals = [v for n, _, _, v in scored if n == baseline]
            print(f"{baseline}: wall {spread(base)} s, val {spread(vals)}; fast/{baseline} wall ratio "
                  f"{statistics.mean(s for s, _ in fast) / statistics.mean(base):.3f}")


if __name__ == "__main__":
    main()
