"""bench.py: time the real training loop on any preset, as nanoGPT's bench.py times its own.

It runs `gpt_train.train.fit` itself (not a copy of it) for `bench_warmup + bench_iters`
iterations into a throwaway out_dir, then reports the median ms/iter of the timed ones,
tokens/s, MFU against the device's peak bf16 FLOP/s and peak memory. So what it measures
is what a training run gets, data loading and logging included.

    python bench.py configs/train_gpt2.py --batch_size=12 --compile=True
    python bench.py configs/train_shakespeare_char_cpu.py --bench_iters=50 --profile=True
"""
import math
import resource
import statistics
import sys
import tempfile
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters

from gpt_train.cli import load_config
from gpt_train.config import TrainConfig, setting
from gpt_train.errors import UserError, exit_on_user_error
from gpt_train.model import flops_per_token
from gpt_train.progress import peak_flops
from gpt_train.out_dir import read_metrics
from gpt_train.progress import format_mfu, mfu
from gpt_train.train import fit, setup


@dataclass
class BenchConfig(TrainConfig):
    gradient_accumulation_steps: int = setting(1, "micro-steps per optimizer step (nanoGPT's bench uses 1)")
    bench_iters: int = setting(20, "timed iterations")
    bench_warmup: int = setting(10, "untimed iterations first: compilation, allocator, caches")
    profile: bool = setting(False, "also write a torch.profiler trace of the run (open in Perfetto)")
    trace_file: str = setting("bench_trace.json", "where --profile writes its trace")

    def validate(self):
        super().validate()
        if self.bench_iters < 1 or self.bench_warmup < 0:
            raise UserError("bench_iters must be at least 1 and bench_warmup not negative")
        return self


def benchmark(cfg):
    with tempfile.TemporaryDirectory() as out_dir:
        cfg.out_dir, cfg.max_iters = out_dir, cfg.bench_warmup + cfg.bench_iters
        cfg.eval_interval, cfg.eval_iters, cfg.log_interval = cfg.max_iters, 1, 1
        # a benchmark logs to metrics.jsonl only: it saves, pushes and reports to wandb or other trackers nothing
        cfg.wandb_log, cfg.report_to, cfg.eval_only = False, "none", False
        cfg.always_save_checkpoint, cfg.push_to_hub = False, False
        run = setup(cfg)
        run.best_val_loss = -math.inf  # nothing beats it, so no evaluation saves
        if cfg.profile:
            _profiled_fit(run, cfg)
        else:
            fit(run)
        if not run.accelerator.is_main_process:
            return None
        steps = [r for r in read_metrics(out_dir, "train") if r["iter"] >= cfg.bench_warmup]
    device = run.accelerator.device
    ms = statistics.median(r["dt_ms"] for r in steps)
    model = run.accelerator.unwrap_model(run.model)
    tokens_per_process = run.sampler.batch_size * cfg.block_size * run.micro_steps  # auto_find_batch_size's split
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "processes": run.accelerator.num_processes,
        "ms_per_iter": ms,
        "tokens_per_sec": run.tokens_per_iter / (ms / 1000),
        "mfu": mfu(flops_per_token(model) * tokens_per_process / (ms / 1000), peak_flops(device)),  # None: n/a
        "peak_memory_gb": _peak_memory_gb(device),
    }
    if cfg.compile:
        # graphs dynamo compiled, and why it broke any: a break splits the step in two (slower)
        result["compiled_graphs"] = counters["stats"]["unique_graphs"]
        result["graph_breaks"] = dict(counters["graph_break"])
        print(f"torch.compile: {result['compiled_graphs']} graph(s) (training, evaluation), "
              f"{sum(result['graph_breaks'].values())} graph break(s)"
              + "".join(f"\n  break x{n}: {reason}" for reason, n in result["graph_breaks"].items()))
    print(f"{result['device']} x{result['processes']}: {ms:.2f} ms/iter (median of {len(steps)}), "
          f"{result['tokens_per_sec']:,.0f} tokens/s, MFU {format_mfu(result['mfu'])}, "
          f"peak memory {result['peak_memory_gb']:.2f} GB")
    if cfg.profile:
        print(f"profiler trace: {cfg.trace_file}")
    return result


def _profiled_fit(run, cfg):
    """fit() under torch.profiler, recording the timed iterations only (not compilation or warmup).

    The profiler steps with the learning-rate schedule, once per training iteration, so the
    trace holds iterations bench_warmup.. and stays small enough to open.
    """
    device = run.accelerator.device.type
    schedule = torch.profiler.schedule(wait=max(cfg.bench_warmup - 1, 0), warmup=min(cfg.bench_warmup, 1),
                                       active=cfg.bench_iters, repeat=1)
    with torch.profiler.profile(schedule=schedule, record_shapes=True,
                                on_trace_ready=lambda p: p.export_chrome_trace(cfg.trace_file)) as prof:
        scheduler = run.schedulers[0]
        step = scheduler.step

        def step_and_profile(*args, **kwargs):
            step(*args, **kwargs)
            prof.step()

        scheduler.step = step_and_profile
        fit(run)
    if run.accelerator.is_main_process:
        sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=20))


def _peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@exit_on_user_error
def main(argv=None):
    benchmark(load_config(sys.argv[1:] if argv is None else argv, BenchConfig))


if __name__ == "__main__":
    main()
