"""The model: GPT2LMHeadModel built from settings or loaded, its optimizer, LR schedule and FLOPs.

nanoGPT's GPT and transformers' GPT-2 are the same network. Their initialisations match
too (normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)), so a scratch
model here starts where nanoGPT's would. Two differences are bridged in this module:
nanoGPT trains with exact GELU (GPT-2 checkpoints keep their tanh GELU), and nanoGPT's
`bias=False` has no biases at all, which GPT-2 cannot express; zero biases that never train
compute the same function and keep the folder a plain GPT-2.

Not here: the training loop, saving and resuming (gpt_train.checkpoint).
"""
import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt_train.errors import UserError

PADDED_GPT2_VOCAB = 50304  # GPT-2's 50,257 rounded up to a multiple of 64: faster matmuls

# Peak dense bf16 FLOP/s for MFU. Anything unrecognised (CPU included) is measured against the
# A100, as nanoGPT does, so numbers stay comparable with its logs.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DEFAULT_PEAK_FLOPS = PEAK_FLOPS["A100"]

# nanoGPT sample.py's sampling, saved as each model's generation defaults so that `pipeline()` and
# `generate` sample like sample.py does unless told otherwise.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 200}

# Names that decide the shape of the network; a checkpoint and the settings must agree on them.
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "vocab_size")


def build_model(cfg, vocab_size, tokenizer):
    """A freshly initialised GPT-2 shaped by the settings."""
    special = tokenizer.eos_token_id  # None for char vocabularies: generation stops at max length
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        activation_function="gelu",  # nanoGPT's exact GELU; one kernel, cheaper than gelu_new
        bos_token_id=special,
        eos_token_id=special,
        bias=cfg.bias,
        attn_implementation="sdpa",
    )
    return ready_for_training(GPT2LMHeadModel(config), cfg.dropout)


def ready_for_training(model, dropout):
    """What every model needs before training, built here or loaded from a folder."""
    model.loss_type = "ForCausalLM"  # the class name does not say so, and transformers warns
    set_generation_defaults(model)
    set_dropout(model, dropout)
    _freeze_biases_if_unused(model)
    return model


def set_generation_defaults(model):
    """Fill the generation settings the model leaves open, so its folder samples sensibly anywhere.

    The default length is half the context, so a prompt of up to the other half fits: the
    text-generation pipeline's own default of 256 new tokens runs past a small model's position
    table (an IndexError). It is max_new_tokens, not max_length, because a saved max_length makes
    every call that passes max_new_tokens warn that both are set. A model with an end-of-text
    token pads with it; a char model has none and runs to the requested length.
    """
    generation = model.generation_config
    for name, value in SAMPLING_DEFAULTS.items():
        if getattr(generation, name) is None:
            setattr(generation, name, value)
    if generation.max_length is None and generation.max_new_tokens is None:
        generation.max_new_tokens = model.config.n_positions // 2
    if generation.pad_token_id is None and generation.eos_token_id is not None:
        generation.pad_token_id = generation.eos_token_id


def _freeze_biases_if_unused(model):
    """Make `bias=False` models bias-free in effect: every bias zero and excluded from training."""
    if getattr(model.config, "bias", True):
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
                p.requires_grad_(False)


def set_dropout(model, dropout):
    """Override a loaded model's dropout, as nanoGPT allows when fine-tuning."""
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = dropout
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):  # SDPA reads its rate from attn_dropout.p too
            module.p = dropout


def check_architecture(model, cfg, where):
    """A loaded model keeps its own shape; settings that say otherwise are a mistake."""
    for name in ("n_layer", "n_head", "n_embd"):
        ours, theirs = getattr(cfg, name), getattr(model.config, name)
        if ours != theirs:
            raise UserError(f"{where} has {name}={theirs} but the settings say {name}={ours}: "
                            f"drop the {name} override (the model's shape comes from {where})")


def count_parameters(model, non_embedding=True):
    """Trainable-size count as nanoGPT reports it: position embeddings excluded by default."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.transformer.wpe.weight.numel()
    return n


def make_optimizer(model, cfg, device_type):
    """AdamW with weight decay on matmul and embedding weights only, fused on CUDA."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type == "cuda")


def lr_multiplier(cfg):
    """nanoGPT's schedule as a LambdaLR factor: linear warmup, cosine to min_lr, then flat.

    transformers' get_cosine_with_min_lr_schedule_with_warmup warms up from 0 at step 0,
    nanoGPT from lr/(warmup+1); keeping nanoGPT's curve keeps its published runs reproducible.
    """
    peak, floor, warmup, decay_end = cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters

    def multiplier(it):
        if not cfg.decay_lr or peak == 0:
            return 1.0
        if it < warmup:
            return (it + 1) / (warmup + 1)
        if it >= decay_end:
            return floor / peak
        ratio = (it - warmup) / (decay_end - warmup)
        return (floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)) / peak

    return multiplier


def flops_per_token(model):
    """Training FLOPs per token (forward and backward), PaLM appendix B as in nanoGPT."""
    c = model.config
    return 6 * count_parameters(model) + 12 * c.n_layer * c.n_embd * c.n_positions


def peak_flops(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for chip, flops in PEAK_FLOPS.items():
            if chip in name:
                return flops
    return DEFAULT_PEAK_FLOPS
