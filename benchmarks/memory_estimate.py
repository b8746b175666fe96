"""gpt_train.memory's estimate of a run's peak memory against the peak torch's MemTracker measures
for the same run's training step, on CPU, for each kind of run the estimate distinguishes.

Each case is a real run: gpt-train's setup (model, optimizers, Accelerate) on the shakespeare_char
data, then two optimizer steps of two micro-steps each through the training loop's own functions;
the second step is measured (the optimizer's state exists by then). MemTracker counts every tensor
torch allocates (weights, gradients, optimizer state, activations and temporaries), not the
process's RSS: the allocator's and Python's own overhead are not in it, nor in the estimate.
On a GPU (--device=cuda) the measure is torch.cuda.max_memory_allocated, the cases GPT-2's
shapes at their presets' micro-batches (random weights: nothing is downloaded), and each step is
timed too.

    python data_prep/shakespeare_char/prepare.py && python data_prep/shakespeare/prepare.py   # once
    python benchmarks/memory_estimate.py [--data_dir=data/shakespeare_char] [--bpe_data_dir=data/shakespeare]
    python benchmarks/memory_estimate.py --device=cuda
"""
import argparse
import os
import sys
import tempfile
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt_train.cli import load_config  # noqa: E402
from gpt_train.device import fsdp_compute_dtype, mixed_precision  # noqa: E402
from gpt_train.errors import UserError  # noqa: E402
from gpt_train.memory import Workload, estimate  # noqa: E402
from gpt_train.train import forward_loss, setup, train, train_batches  # noqa: E402

SHAPE = ["--n_layer=6", "--n_head=6", "--n_embd=192", "--block_size=128", "--batch_size=16",
         "--gradient_accumulation_steps=2", "--device=cpu", "--compile=False", "--dropout=0.0", "--eval_iters=1"]
# (name, settings): each thing the estimate counts differently
CASES = [
    ("float32, AdamW", []),
    ("bfloat16 autocast", ["--dtype=bfloat16"]),
    ("dropout 0.1", ["--dropout=0.1"]),
    ("gradient checkpointing", ["--gradient_checkpointing=True"]),
    ("gradient checkpointing, bf16", ["--gradient_checkpointing=True", "--dtype=bfloat16"]),
    ("8-bit AdamW", ["--optimizer=adamw_8bit"]),
    ("Muon", ["--optimizer=muon"]),
    ("wider, shorter, bf16", ["--n_layer=2", "--n_embd=512", "--n_head=8", "--block_size=64", "--dtype=bfloat16"]),
    ("LoRA on a trained model", ["--finetune_method=lora", "--init_from={base}"]),
    ("GPT-2's vocabulary (logits)", ["--data_dir={bpe}", "--n_layer=2", "--n_embd=64", "--n_head=2", "--batch_size=4"]),
    ("GPT-2's vocabulary, bf16", ["--data_dir={bpe}", "--n_layer=2", "--n_embd=64", "--n_head=2", "--batch_size=4",
                                  "--dtype=bfloat16"]),
    ("GPT-2's vocabulary, chunked loss", ["--data_dir={bpe}", "--n_layer=2", "--n_embd=64", "--n_head=2",
                                          "--batch_size=16", "--chunked_loss=True"]),
    ("GPT-2's vocabulary, chunked loss, bf16", ["--data_dir={bpe}", "--n_layer=2", "--n_embd=64", "--n_head=2",
                                                "--batch_size=16", "--chunked_loss=True", "--dtype=bfloat16"]),
]
GPT2 = ["--data_dir={bpe}", "--block_size=1024", "--dtype=bfloat16", "--device=cuda"]
GPT2_XL = [*GPT2, "--n_layer=48", "--n_head=25", "--n_embd=1600", "--batch_size=1", "--gradient_accumulation_steps=2"]
GPU_CASES = [
    ("GPT-2 124M, 12 x 1024, eager", [*GPT2, "--n_layer=12", "--n_head=12", "--n_embd=768", "--batch_size=12"]),
    ("GPT-2 124M, 12 x 1024, compiled", [*GPT2, "--n_layer=12", "--n_head=12", "--n_embd=768", "--batch_size=12",
                                         "--compile=True"]),
    ("gpt2-xl shape, full, 1 x 1024", GPT2_XL),
    ("gpt2-xl shape, 8-bit AdamW", [*GPT2_XL, "--optimizer=adamw_8bit"]),
    ("gpt2-xl shape, LoRA", [*GPT2_XL, "--finetune_method=lora", "--init_from={xl_base}"]),
]


def measured_and_estimated(argv):
    """(measured peak bytes, the estimate's Need, seconds on a GPU) of one optimizer step of the run `argv`
    sets up."""
    cfg = load_config(argv)
    run = setup(cfg)
    model, acc = run.model, run.accelerator
    batches = train_batches(run)

    def step(tracker=None):
        for _ in range(run.micro_steps):
            if tracker:  # it keeps per-module figures of one call only; its peak stays
                tracker.reset_mod_stats()
            with acc.accumulate(model):
                x, y, targets = next(batches)
                acc.backward(forward_loss(model, x, y, targets))
        for optimizer in run.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds, peak = time.perf_counter() - t0, torch.cuda.max_memory_allocated()
    else:
        seconds, peak = None, track_peak(model, run.optimizers, step)
    dtype = fsdp_compute_dtype(mixed_precision(cfg.dtype, acc.device))
    vocab_size = acc.unwrap_model(model).config.vocab_size
    run.lock.release()
    return peak, estimate(Workload(run.cfg, vocab_size, acc.device.type, dtype)), seconds


def track_peak(model, optimizers, step):
    """The peak of every tensor torch allocates during `step`, by MemTracker."""
    tracker = MemTracker()
    tracker.track_external(model, *optimizers)
    for p in model.parameters():  # frozen ones (LoRA's base) take no gradient hook: MemTracker would try one
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (NO_HOOK, NO_HOOK)
    with tracker:
        step(tracker)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


class NO_HOOK:
    @staticmethod
    def remove():
        pass


def trained_base(data_dir, folder, *settings):
    """A model folder for the LoRA case, trained one step."""
    train(load_config([f"--data_dir={data_dir}", f"--out_dir={folder}", *SHAPE, *settings, "--max_iters=1",
                       "--eval_interval=1"]))
    forget_accelerate()
    return folder


def forget_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data_dir", default="data/shakespeare_char")
    ap.add_argument("--bpe_data_dir", default="data/shakespeare", help="GPT-2 BPE data, for the logits' cases")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    for data, script in ((args.data_dir, "shakespeare_char"), (args.bpe_data_dir, "shakespeare")):
        if not os.path.exists(os.path.join(data, "train.bin")):
            sys.exit(f"no {data}/train.bin: python data_prep/{script}/prepare.py first")
    torch.manual_seed(0)
    gpu = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        base = trained_base(args.data_dir, os.path.join(tmp, "base"))
        xl_base = trained_base(args.bpe_data_dir, os.path.join(tmp, "xl"), *GPT2_XL[1:]) if gpu else None
        shape = "GPT-2 shapes, 2 micro-steps" if gpu else "6 x 192, 16 x 128 tokens, 2 micro-steps"
        gpu_columns = (" step | tokens/s |", "---|---|") if gpu else ("", "")
        print(f"| run ({shape}) | measured peak | estimate | estimate / measured |{gpu_columns[0]}")
        print("|---|---|---|---|" + gpu_columns[1])
        for i, (name, extra) in enumerate(GPU_CASES if gpu else CASES):
            argv = [f"--data_dir={args.data_dir}", f"--out_dir={tmp}/run{i}", *SHAPE,
                    *(setting.format(base=base, bpe=args.bpe_data_dir, xl_base=xl_base) for setting in extra)]
            try:
                peak, need, seconds = measured_and_estimated(argv)
            except UserError as e:  # a case this machine cannot run (8-bit AdamW without bitsandbytes)
                print(f"| {name} | skipped: {e} |", flush=True)
                continue
            finally:
                forget_accelerate()
            unit, size = ("GiB", 2 ** 30) if gpu else ("MiB", 2 ** 20)
            row = f"| {name} | {peak / size:,.1f} {unit} | {need.total / size:,.1f} {unit} | {need.total / peak:.2f} |"
            if seconds:
                cfg = load_config(argv)
                tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
                row += f" {seconds * 1e3:,.0f} ms | {tokens / seconds:,.0f} |"
            print(row, flush=True)

if __name__ == "__main__":
    main()
