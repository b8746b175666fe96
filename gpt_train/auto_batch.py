"""auto_find_batch_size: the largest micro-batch that fits the device, tokens per iteration kept.

Transformers' Trainer (through Accelerate's find_executable_batch_size) shrinks the batch by a
tenth or a half per out-of-memory error and so changes the optimisation. Here the candidates are
the divisors of the rows an iteration gives each process (batch_size x micro-steps), largest
first, and the micro-steps grow as the micro-batch shrinks: the tokens per iteration, and so the
learning-rate schedule's meaning, stay what the preset says.

Each candidate runs one probe before training: a forward and backward of a micro-batch of
random tokens while a block of the size of the optimizer's state is held (that state does not
exist yet at the start of a new run). The probe leaves the weights, the RNGs and the data as
they were, so the run that follows is the one `--batch_size=FOUND` would have been. Under DDP
each process probes without gradient synchronisation and all take the largest size that fits
on every one of them. FSDP gathers weights inside the forward, where one process's error would
leave the others waiting: not supported there.
"""
import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from gpt_train.errors import UserError


def candidates(rows, largest):
    """The divisors of `rows` (micro-batches of one iteration on one process) up to `largest`, largest first."""
    return [b for b in range(min(rows, largest), 0, -1) if rows % b == 0]


def find_batch_size(run, forward_loss, largest, reserve_bytes):
    """The largest micro-batch of candidates(...) whose probe fits on every process; `run`'s sampler
    and micro-steps are set to it. `largest`: where to start (the memory estimate may already rule
    out bigger ones); `reserve_bytes`: held during each probe for the optimizer state to come."""
    acc, cfg = run.accelerator, run.cfg
    rows = run.sampler.batch_size * run.micro_steps
    tried = []
    for batch_size in candidates(rows, largest):
        fits = _probe(run, forward_loss, batch_size, reserve_bytes)
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
    acc.gradient_accumulation_steps = run.micro_steps
    ran_out = f"{', '.join(map(str, tried))} ran out of memory; " if tried else ""
    acc.print(f"auto_find_batch_size: micro-batch {ran_out}{batch_size} fits: {batch_size} x {run.micro_steps} "
              f"micro-steps per process ({run.tokens_per_iter:,} tokens per iteration, as set)")
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
            with acc.no_sync(model):
                loss = forward_loss(model, x, x)
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
