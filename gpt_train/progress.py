"""Seeing how training goes: the rate and ETA on the log line, bars for long steps, the summary.

All of it runs outside the optimizer step: the ETA reads the clock at log lines only, bars
wrap evaluation, and the summary is written once at the end. Bars are tqdm, on the main
process only, and only when stdout is a terminal (a log file gets no carriage-return noise);
`progress=False` or tqdm's own `TQDM_DISABLE=1` turn them off.

MFU is measured against the peak FLOP/s of the device's data sheet (PEAK_FLOPS, below).

Not here: the numbers of the step itself (the loop measures dt, loss and MFU).
"""
import os
import re
import shlex
import statistics
import sys
import time

import torch
from accelerate.utils import tqdm

from gpt_train.out_dir import METRICS, best_eval, is_model_folder, read_metrics

SECONDS_PER = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_duration(seconds):
    """'2h05m', '3m07s', '42s': the two largest units, enough to plan around."""
    seconds = max(0, int(round(seconds)))
    parts = []
    for unit, size in SECONDS_PER:
        if seconds >= size or (unit == "s" and not parts):
            value, seconds = divmod(seconds, size)
            parts.append(f"{value}{unit}" if not parts else f"{value:02d}{unit}")
        if len(parts) == 2:
            break
    return "".join(parts)


def bar(enabled, iterable, desc):
    """`iterable`, with a tqdm bar on the main process's terminal; a plain iterable elsewhere."""
    # TQDM_DISABLE is checked here: Accelerate's tqdm passes disable=False, which overrides it
    if not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true") or not sys.stdout.isatty():
        return iterable
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, main_process_only=True)


# Peak dense (not 2:4 sparse) bf16 tensor FLOP/s with float32 accumulation, from NVIDIA's data
# sheets, for MFU: (a word of torch.cuda.get_device_name, compute capability, FLOP/s). The first
# match wins, so a card's variants come before its plain name (an H100 in a name is the SXM part).
# Anything else, and a CPU, has no MFU: nanoGPT measures every device against an A100, which reads
# 0.01% on a laptop and ~3x too high on a B200.
PEAK_FLOPS = (
    ("H100 PCIe", (9, 0), 756e12), ("H100 NVL", (9, 0), 835e12), ("H100", (9, 0), 989e12),
    ("H200 NVL", (9, 0), 835e12), ("H200", (9, 0), 989e12), ("GH200", (9, 0), 989e12),
    ("A100", (8, 0), 312e12), ("A800", (8, 0), 312e12), ("L40S", (8, 9), 362e12), ("L4", (8, 9), 121e12),
    ("RTX 4090", (8, 9), 165e12), ("RTX 5090", (12, 0), 209.5e12), ("B200", (10, 0), 2250e12),
)


def peak_flops(device):
    """The device's peak dense bf16 FLOP/s from PEAK_FLOPS, or None where it is not known (MFU n/a)."""
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def gpu_peak_flops(name, capability):
    """PEAK_FLOPS' entry for a GPU by name, as a whole word ('L4' is not 'L40S'), and compute
    capability (a renamed or cut-down part with another architecture is not guessed at); else None."""
    if "MIG" in name or "Laptop" in name:  # a slice of the GPU, or a laptop part: not the data sheet's peak
        return None
    for chip, chip_capability, flops in PEAK_FLOPS:
        if re.search(rf"(^|[\s-]){re.escape(chip)}($|[\s-])", name) and tuple(capability) == chip_capability:
            return flops
    return None


def mfu(flops_per_sec, peak_flops):
    """Model FLOPs utilisation, or None where the device's peak is not known (PEAK_FLOPS)."""
    return flops_per_sec / peak_flops if peak_flops else None


def format_mfu(value):
    """'36.52%', or 'n/a' for an MFU not known or not yet measured (None, or the loop's -1)."""
    return f"{value * 100:.2f}%" if value is not None and value >= 0 else "n/a"


MFU_WARMUP_ITERS = 5  # let the loop settle before timing it, as nanoGPT does


class Progress:
    """Rate, time left and the end-of-run summary for one call of the training loop."""

    def __init__(self, accelerator, out_dir, max_iters, start_iter, tokens_per_iter, flops_per_iter, peak_flops,
                 mfu_shown=True):
        self.print, self.out_dir, self.max_iters = accelerator.print, out_dir, max_iters
        self.start_iter, self.tokens_per_iter = start_iter, tokens_per_iter
        self.flops_per_iter, self.peak_flops, self.mfu_shown = flops_per_iter, peak_flops, mfu_shown
        self.started = time.time()
        self.running_mfu = -1.0  # nanoGPT's running average; -1: not measured yet
        self.mark = None  # (iteration, time) after the first logged step: compilation stays out of the rate
        self.step_seconds = []

    def step_line(self, iter_num, loss, dt):
        """nanoGPT's log line of iteration `iter_num` (its loss took `dt` seconds), and what the
        trackers log with it. MFU is averaged as nanoGPT does, from the MFU_WARMUP_ITERS-th step on."""
        if iter_num - self.start_iter >= MFU_WARMUP_ITERS and self.peak_flops:
            value = self.flops_per_iter / dt / self.peak_flops
            self.running_mfu = value if self.running_mfu == -1.0 else 0.9 * self.running_mfu + 0.1 * value
        tokens_per_sec = self.tokens_per_iter / dt
        mfu_text = f"mfu {format_mfu(self.running_mfu)}, " if self.mfu_shown else ""
        line = (f"iter {iter_num}: loss {loss:.4f}, time {dt * 1000:.2f}ms, {mfu_text}{tokens_per_sec:,.0f} tok/s"
                f"{self.eta(iter_num, dt)}")
        return line, {"dt_ms": dt * 1000, "tokens_per_sec": tokens_per_sec, **self.mfu_record()}

    def mfu_record(self):
        return {"mfu": self.running_mfu * 100} if self.running_mfu >= 0 else {}  # no placeholder in the log or wandb

    def eta(self, iter_num, dt):
        """', 12.3 it/s, ETA 4m05s' for the log line of iteration `iter_num` (empty on the first)."""
        now = time.time()
        self.step_seconds.append(dt)
        if self.mark is None or iter_num <= self.mark[0]:
            self.mark = (iter_num, now)
            return ""
        # Wall clock over whole iterations, so evaluations and checkpoints are priced in.
        rate = (iter_num - self.mark[0]) / (now - self.mark[1])
        speed = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it"
        return f", {speed}, ETA {format_duration((self.max_iters - iter_num - 1) / rate)}"

    def summary(self, iter_num, stopped_by=None):
        """The closing lines: best val loss, tokens, time, throughput, where the model is (and, after
        a stop signal, that its weights are the last step's, not those of the best evaluation)."""
        wall = time.time() - self.started
        trained = iter_num - self.start_iter
        lines = [f"done: {trained:,} iterations in {format_duration(wall)} "
                 f"(iter {self.start_iter:,} -> {iter_num:,}), {iter_num * self.tokens_per_iter:,} tokens seen"]
        best = best_eval(read_metrics(self.out_dir)) if os.path.isfile(os.path.join(self.out_dir, METRICS)) else None
        if best:  # from metrics.jsonl: after a resume it covers the whole run
            lines.append(f"best val loss {best[1]:.4f} at iter {best[0]:,}")
        if self.step_seconds and wall > 0:
            # The median step leaves out compilation and the steps that carried an evaluation.
            step = statistics.median(self.step_seconds[1:] or self.step_seconds)
            shown = f", MFU {format_mfu(mfu(self.flops_per_iter / step, self.peak_flops))}" if self.mfu_shown else ""
            lines.append(f"throughput: {trained * self.tokens_per_iter / wall:,.0f} tok/s over the wall time "
                         f"(evals included); median step {step * 1000:.1f} ms = "
                         f"{self.tokens_per_iter / step:,.0f} tok/s{shown}")
        if is_model_folder(self.out_dir):
            held = f" (iteration {iter_num:,}, saved on {stopped_by} without an evaluation)" if stopped_by else ""
            lines.append(f"model folder: {os.path.abspath(self.out_dir)}{held}")
            lines.append(f"sample from it: python sample.py --out_dir={shlex.quote(self.out_dir)}")
        else:
            lines.append(f"no checkpoint was written to {self.out_dir}")
        self.print("\n".join(lines))
