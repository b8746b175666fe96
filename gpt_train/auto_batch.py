"""auto_find_batch_size: the largest micro-batch that fits the device, tokens per iteration kept.

Transformers' Trainer (through Accelerate's find_executable_batch_size) shrinks the batch by a
tenth or a half per out-of-memory error and so changes the optimisation. Here the candidates are
the divisors of the rows an iteration gives each process (batch_size x micro-steps), largest
first, and the micro-steps grow as the micro-batch shrinks: the tokens per iteration, and so the
learning-rate schedule's meaning, stay what the preset says.

Each candidate runs one probe before training: a forward and backward of a micro-batch of
random tokens while a block is held for what the loop will hold besides and the probe does not:
the optimizer's state (it does not exist yet at the start of a new run) and, where an iteration
has several micro-steps, the gradients the later micro-steps' forwards run beside. The probe
leaves the weights, the RNGs and the data as they were, so the run that follows is the one
`--batch_size=FOUND` would have been; evaluations take more batches of the smaller size, as many
rows as eval_iters of batch_size. Under DDP each process probes without gradient synchronisation
and all take the largest size that fits on every one of them. FSDP gathers weights inside the
forward, where one process's error would leave the others waiting: not supported there. On a
CPU running out of memory is mostly the kernel's kill, which no probe sees: there the memory
estimate (gpt_train.memory) is the guard.
"""
import math

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from gpt_train.errors import UserError


def candidates(rows, largest):
    """The divisors of `rows` (micro-batches of one iteration on one process) up to `largest`, largest first."""
    return [b for b in range(min(rows, largest), 0, -1) if rows % b == 0]


def find_batch_size(run, forward_loss, state_bytes, saved=None):
    """The largest micro-batch of candidates(...) up to batch_size whose probe fits on every
    process; `run`'s sampler, micro-steps and evaluation batches are set to it. `state_bytes`: the
    optimizer state to come (0 on a resume, whose state is loaded); `saved`: the micro-batch the
    resumed run trained with, if it was chosen so."""
    acc, cfg = run.accelerator, run.cfg
    rows = cfg.batch_size * run.micro_steps
    gradient_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
    tried = []
    for batch_size in candidates(rows, cfg.batch_size):
        reserve = state_bytes + (gradient_bytes if rows // batch_size > 1 else 0)
        fits = _probe(run, forward_loss, batch_size, reserve)
        if acc.num_processes > 1:  # every process the same answer, or DDP's next all-reduce would hang
            fits = acc.reduce(torch.tensor(int(fits), device=acc.device), reduction="sum").item() == acc.num_processes
        if fits:
            break
        tried.append(batch_size)
    else:
        raise UserError(f"auto_find_batch_size: even a micro-batch of 1 x {cfg.block_size} tokens runs out of memory "
                        f"on {acc.device.type}: try --gradient_checkpointing=True, --chunked_loss=True, a smaller "
                        "block_size or model, or FSDP")
    if tried and cfg.compile:  # the probes' shapes made the compiled graphs dynamic: recompile for this one
        torch._dynamo.reset()
    run.sampler.batch_size, run.micro_steps = batch_size, rows // batch_size
    run.eval_batches = math.ceil(cfg.eval_iters * cfg.batch_size / batch_size)
    acc.gradient_accumulation_steps = run.micro_steps
    ran_out = f"{', '.join(map(str, tried))} ran out of memory; " if tried else ""
    acc.print(f"auto_find_batch_size: micro-batch {ran_out}{batch_size} fits: {batch_size} x {run.micro_steps} "
              f"micro-steps per process ({run.tokens_per_iter:,} tokens per iteration, as set)")
    if saved and saved != batch_size:
        acc.print(f"the run trained with micro-batch {saved} before: its batches from here on differ from those of the "
                  "uninterrupted run (the same tokens per iteration)")
    return batch_size


def _probe(run, forward_loss, batch_size, reserve_bytes):
    """Whether a training micro-step of `batch_size` rows fits, with `reserve_bytes` held besides."""
    acc, model = run.accelerator, run.model
    device = acc.device
    vocab_size = acc.unwrap_model(model).config.vocab_size
    reserve = x = loss = None
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            reserve = torch.empty(int(reserve_bytes), dtype=torch.uint8, device=device)
            generator = torch.Generator(device).manual_seed(0)
            x = torch.randint(vocab_size, (batch_size, run.cfg.block_size), device=device, generator=generator)
            with acc.no_sync(model):  # targets another tensor, as training's are: the compiled graph carries over
                loss = forward_loss(model, x, x.clone())
                acc.backward(loss)
        return True
    except Exception as e:
        if not should_reduce_batch_size(e):
            raise
        return False
    finally:
        del reserve, x, loss
        for optimizer in run.optimizers:
            optimizer.zero_grad(set_to_none=True)
        clear_device_cache(garbage_collection=True)
