"""Optimizers and the learning-rate schedule: nanoGPT's AdamW, bitsandbytes' 8-bit AdamW
(optimizer='adamw_8bit'), torch's Muon for the blocks' matrices (optimizer='muon'), and the
schedules as LambdaLR multipliers.

Adding an optimizer touches this module (a build function and its entry in OPTIMIZERS: its state
size for the memory estimate, its devices, what it does not run with) and the settings' list of
names only. Resume re-applies the settings' hyperparameters over those a restored state brings
back (set_hyperparameters, set_schedule).

Not here: the network (gpt_train.model), the loop that steps them (gpt_train.train).
"""
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpt_train.errors import UserError
from gpt_train.model import BLOCKS

FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def _trained(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _groups(params):
    """nanoGPT's two groups: weight decay on matrices and embeddings only."""
    return [{"params": [p for p in params if p.dim() >= 2], "kind": "decay"},
            {"params": [p for p in params if p.dim() < 2], "kind": "no_decay"}]


def build_adamw(model, cfg, device_type):
    # One fused kernel for all tensors: on CPU too, where it took the optimizer step from 2.7 to
    # 1.0 ms of a 37 ms CPU-recipe step.
    groups = _groups([p for _, p in _trained(model)])
    return [torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=device_type in FUSED_ADAMW_DEVICES)]


def build_adamw_8bit(model, cfg, device_type):
    """bitsandbytes' AdamW8bit: both moments in 8 bits, blockwise quantised (2 bytes of state per
    parameter instead of 8), for tensors of 4,096 elements or more; smaller ones (LayerNorms,
    biases) keep 32-bit state. It runs on CUDA and, from bitsandbytes 0.48, on CPUs."""
    try:
        import bitsandbytes  # deferred: ~0.9 s, for this optimizer alone
    except ImportError as e:
        raise UserError(f"optimizer='adamw_8bit' needs bitsandbytes ({e}): pip install -r requirements.txt, or use "
                        "optimizer='adamw'") from None
    return [bitsandbytes.optim.AdamW8bit(_groups([p for _, p in _trained(model)]), lr=cfg.learning_rate)]


def build_muon(model, cfg, device_type):
    """torch's Muon takes the blocks' matrices (attention and MLP weights) and AdamW keeps the rest:
    the embeddings (the head is tied to them), LayerNorms and biases.

    Muon's learning rate is adjusted per matrix by torch's "match_rms_adamw" rule,
    0.2 * sqrt(max(rows, cols)): it treats a matrix and its transpose alike, so GPT-2's Conv1D
    layout (weights stored as in x out, not nn.Linear's out x in) changes nothing. Newton-Schulz
    orthogonalisation is transpose-symmetric too.
    """
    named = _trained(model)
    matrices = [p for name, p in named if p.dim() == 2 and name.startswith(BLOCKS)]
    rest = [p for _, p in named if not any(p is q for q in matrices)]
    adamw = torch.optim.AdamW(_groups(rest), lr=cfg.learning_rate, fused=device_type in FUSED_ADAMW_DEVICES)
    if not matrices:
        return [adamw]
    muon_class = Float32Muon if device_type == "cpu" else torch.optim.Muon
    return [adamw, muon_class([{"params": matrices, "kind": "muon"}], lr=cfg.muon_learning_rate,
                              adjust_lr_fn="match_rms_adamw")]


@dataclass(frozen=True)
class OptimizerFacts:
    """What the rest of gpt-train needs to know of an optimizer, in one place."""

    build: Callable  # (model, settings, device type) -> [torch optimizers], sharing one LR multiplier
    label: str  # how the memory estimate names its state
    state_bytes: float  # optimizer state per trained parameter (gpt_train.memory)
    matrix_state_bytes: float | None = None  # per parameter of the blocks' matrices, where that differs
    devices: tuple | None = None  # device types it runs on; None: every one
    not_under_fsdp: str | None = None  # why it does not run under FSDP, with what to do instead
    trains_lora: bool = True  # whether LoRA's adapters may be trained with it
    saves_memory_over: str | None = None  # the optimizer a memory refusal may suggest replacing with it


# The optimizers by their setting's name (config.OPTIMIZERS lists the same names, for --help).
OPTIMIZERS = {
    "adamw": OptimizerFacts(build_adamw, "AdamW", state_bytes=8),  # two float32 moments
    # a byte per moment (tensors under 4,096 elements keep float32, too few to count)
    "adamw_8bit": OptimizerFacts(
        build_adamw_8bit, "8-bit AdamW", state_bytes=2, devices=("cuda", "cpu"), saves_memory_over="adamw",
        not_under_fsdp="FSDP already shards AdamW's state; use optimizer='adamw', or DDP "
                       "(accelerate_configs/8xa100.yaml) with adamw_8bit"),
    # one float32 momentum for the blocks' matrices, AdamW's two for the rest
    "muon": OptimizerFacts(
        build_muon, "Muon/AdamW", state_bytes=8, matrix_state_bytes=4, trains_lora=False,
        not_under_fsdp="Newton-Schulz needs whole matrices and FSDP shards them; use DDP "
                       "(accelerate_configs/8xa100.yaml) or optimizer='adamw'"),
}


def make_optimizers(model, cfg, device_type):
    """The optimizers cfg.optimizer names, their hyperparameters from the settings."""
    facts = OPTIMIZERS[cfg.optimizer]
    if facts.devices and device_type not in facts.devices:
        raise UserError(f"optimizer={cfg.optimizer!r} does not run on {device_type}: {facts.label} runs on "
                        f"{' and '.join(facts.devices)}; use optimizer='adamw'")
    optimizers = facts.build(model, cfg, device_type)
    for optimizer in optimizers:
        set_hyperparameters(optimizer, cfg)
    return optimizers


class Float32Muon(torch.optim.Muon):
    """torch's Muon with its Newton-Schulz orthogonalisation in float32 instead of bfloat16, for CPUs.

    torch casts each update to bfloat16 for Newton-Schulz, which is fast on GPUs but not on CPUs
    without bfloat16 matrix units (AVX2, as on the machines gpt-train is measured on): there a
    128x512 @ 512x128 product took 14.0 ms in bfloat16 and 1.4 ms in float32, and a CPU-recipe step
    with torch's Muon 920 ms instead of 149 ms. Everything else is torch's Muon; the iteration is
    torch's too (same quintic, coefficients and normalisation), only the dtype differs.
    """

    def step(self, closure=None):
        original = torch.optim._muon._zeropower_via_newtonschulz
        torch.optim._muon._zeropower_via_newtonschulz = _newton_schulz_float32
        try:
            return super().step(closure)
        finally:
            torch.optim._muon._zeropower_via_newtonschulz = original


def _newton_schulz_float32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz, computed in float32."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def set_hyperparameters(optimizer, cfg):
    """The settings' betas, momentum and weight decay on every parameter group.

    Also after a resume: loading the optimizer's state brings back the hyperparameters it was
    saved with, and a resumed run whose settings change them must train with the new ones.
    """
    for group in optimizer.param_groups:
        kind = _kind(group)
        if kind == "muon":
            group["momentum"] = cfg.muon_momentum
        else:
            group["betas"] = (cfg.beta1, cfg.beta2)
        group["weight_decay"] = 0.0 if kind == "no_decay" else cfg.weight_decay


def set_schedule(optimizer, scheduler, cfg):
    """Put the settings' learning rate under a restored LambdaLR, as set_hyperparameters does for
    the rest: its state holds the peak learning rate it was saved with. The multiplier itself is
    rebuilt from the settings (LambdaLR saves no plain functions), so the rate is recomputed."""
    scheduler.base_lrs = [cfg.muon_learning_rate if _kind(group) == "muon" else cfg.learning_rate
                          for group in optimizer.param_groups]
    for group, base, multiplier in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                       strict=True):
        group["initial_lr"] = base
        group["lr"] = base * multiplier(scheduler.last_epoch)


def _kind(group):
    # checkpoints from before parameter groups were named: the decaying group is the one with decay
    return group.get("kind", "decay" if group["weight_decay"] > 0 else "no_decay")


def schedule_warning(cfg):
    """A warning about a schedule that is legal but probably not meant, or None."""
    if cfg.decay_lr and cfg.warmup_iters > cfg.lr_decay_iters:
        return (f"warning: warmup_iters ({cfg.warmup_iters}) outlasts lr_decay_iters ({cfg.lr_decay_iters}): the "
                f"learning rate rises until iteration {cfg.warmup_iters}, then drops to min_lr")
    return None


def lr_multiplier(cfg):
    """The schedule as a LambdaLR factor of the peak learning rate (every optimizer's).

    'cosine' is nanoGPT's: linear warmup, cosine to min_lr at lr_decay_iters, then flat.
    transformers' get_cosine_with_min_lr_schedule_with_warmup warms up from 0 at step 0,
    nanoGPT from lr/(warmup+1); keeping nanoGPT's curve keeps its published runs reproducible.
    'wsd' (warmup-stable-decay) holds the peak after the warmup and decays linearly to min_lr
    over the last cooldown_iters before lr_decay_iters. Defined at every iteration, also when
    the warmup outlasts the decay (the rate then warms up until warmup_iters).
    """
    peak, floor, warmup, decay_end = cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters
    cooldown_start = decay_end - cfg.cooldown_iters

    def multiplier(it):
        if not cfg.decay_lr or peak == 0:
            return 1.0
        if it < warmup:
            return (it + 1) / (warmup + 1)
        if it >= decay_end:
            return floor / peak
        if cfg.lr_schedule == "wsd":
            if it < cooldown_start:
                return 1.0
            return (floor + (decay_end - it) / (decay_end - cooldown_start) * (peak - floor)) / peak
        ratio = (it - warmup) / (decay_end - warmup)
        return (floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)) / peak

    return multiplier
