"""The model: GPT2LMHeadModel built from settings or loaded, its optimizer, LR schedule and FLOPs.

nanoGPT's GPT and transformers' GPT-2 are the same network. Their initialisations match
too (normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)), so a scratch
model here starts where nanoGPT's would. Two differences are bridged in this module:
nanoGPT trains with exact GELU (GPT-2 checkpoints keep their tanh GELU), and nanoGPT's
`bias=False` has no biases at all, which GPT-2 cannot express; zero biases that never train
compute the same function and keep the folder a plain GPT-2.

Not here: the training loop, saving and resuming (gpt_train.checkpoint).
"""
import json
import math
import os

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from gpt_train.config import with_values
from gpt_train.errors import UserError, first_line

VOCAB_MULTIPLE = 64  # vocabularies rounded up to a multiple of it, as nanoGPT does for GPT-2: faster matmuls
PADDED_GPT2_VOCAB = 50304  # GPT-2's 50,257, so rounded

# Peak dense bf16 FLOP/s for MFU. Anything unrecognised (CPU included) is measured against the
# A100, as nanoGPT does, so numbers stay comparable with its logs.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DEFAULT_PEAK_FLOPS = PEAK_FLOPS["A100"]

FUSED_ADAMW_DEVICES = ("cuda", "cpu")

# OpenAI's checkpoints under the short names nanoGPT uses for them.
GPT2_HUB_IDS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
HUB_FILES = ["*.json", "*.safetensors", "*.txt"]  # config, weights, tokenizer
HUB_TIMEOUT_S = 10  # per request: an unreachable Hub fails in seconds rather than hanging

# nanoGPT sample.py's sampling, saved as each model's generation defaults so that `pipeline()` and
# `generate` sample like sample.py does unless told otherwise.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 200}
BLOCKS = "transformer.h."  # the transformer blocks' parameters, by name
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper puts it before every parameter name

# Training reads whole unpadded blocks, so causality is SDPA's is_causal and needs no mask tensor.
# Under torch.compile transformers builds one anyway (before torch 2.14 it cannot tell compiling
# from exporting), and given a mask SDPA cannot run flash attention: compiled GPT-2 124M trained at
# 0.83x a plain PyTorch step on an H200. This is "sdpa" minus the mask, for training and evaluation
# only: generation with a KV cache or padding needs the mask, so saved folders keep "sdpa".
CAUSAL_SDPA = "gpt_train_causal_sdpa"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
AttentionMaskInterface.register(CAUSAL_SDPA, lambda *args, **kwargs: None)


def scratch_vocab_size(meta_vocab_size, tokenizer):
    """A new model's vocabulary: nanoGPT's meta.pkl size for char data, exactly (nanoGPT's char
    models are 65 wide), else the tokenizer's rounded up to a multiple of VOCAB_MULTIPLE."""
    return meta_vocab_size or -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def gpt2_config(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias, end_of_text_id, **extra):
    """nanoGPT's GPT as a GPT2Config (also for converted nanoGPT checkpoints). end_of_text_id is
    None for char vocabularies: generation then runs to its length."""
    return GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                      activation_function="gelu",  # nanoGPT's exact GELU; one kernel, cheaper than gelu_new
                      bos_token_id=end_of_text_id, eos_token_id=end_of_text_id, bias=bias, **extra)


def build_model(cfg, vocab_size, tokenizer):
    """A freshly initialised GPT-2 shaped by the settings."""
    config = gpt2_config(vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias,
                         tokenizer.eos_token_id, attn_implementation="sdpa")
    return ready_for_training(GPT2LMHeadModel(config), cfg.dropout)


def ready_for_training(model, dropout):
    """What every model needs before training, built here or loaded from a folder."""
    model.loss_type = "ForCausalLM"  # the class name does not say so, and transformers warns
    set_generation_defaults(model.config, model.generation_config)
    set_dropout(model, dropout)
    _freeze_biases_if_unused(model)
    return model


def use_causal_sdpa(model):
    """Attend through SDPA's is_causal, never a mask tensor (CAUSAL_SDPA): for the training loop."""
    model.set_attn_implementation(CAUSAL_SDPA)


def set_generation_defaults(config, generation):
    """Fill what the model's folder tells other programs and leaves open, so it works anywhere.

    The default length is the context, `max_length = n_positions`: a caller's `max_length` is
    then obeyed exactly, and `pipeline()` and lm-eval stay inside the position table whatever
    the prompt (past it GPT-2 fails with an IndexError). A caller passing `max_new_tokens` gets
    transformers' warning that both are set (its value wins) and must keep prompt plus new
    tokens inside the context. Folders written before saved `max_new_tokens = n_positions // 2`,
    which overrode every caller's max_length: that default is replaced. `n_ctx` repeats the
    context under GPT-2's original name, which llama.cpp's converter reads. A model with an
    end-of-text token pads with it; a char model has none and runs to the requested length.
    """
    context = config.n_positions
    for name, value in SAMPLING_DEFAULTS.items():
        if getattr(generation, name) is None:
            setattr(generation, name, value)
    if generation.max_new_tokens == context // 2 and generation.max_length is None:
        generation.max_new_tokens = None  # the old default, see above
    if generation.max_new_tokens is None and (generation.max_length is None or generation.max_length > context):
        generation.max_length = context
    if generation.pad_token_id is None and generation.eos_token_id is not None:
        generation.pad_token_id = generation.eos_token_id
    config.n_ctx = context


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


def pretrained_folder(init_from):
    """The local folder holding `init_from`: a folder as given, or the Hub snapshot in the HF cache.

    A cached snapshot is used without asking the network. Otherwise the files are downloaded
    (config, safetensors weights and tokenizer only, not the TF/Flax/ONNX copies the OpenAI
    repos also hold); with no network this fails within seconds with what to do instead.
    """
    if os.path.isdir(init_from):
        return init_from
    repo = GPT2_HUB_IDS.get(init_from, init_from)
    if init_from.startswith((".", "/", "~")) or os.path.splitext(init_from)[1]:
        raise UserError(f"init_from={init_from!r}: model folder not found")
    try:
        return snapshot_download(repo, allow_patterns=HUB_FILES, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    except ValueError:  # not a valid repo id
        raise UserError(f"init_from={init_from!r} is neither 'scratch', 'resume', a local model folder "
                        "nor a Hub model id") from None
    try:
        return snapshot_download(repo, allow_patterns=HUB_FILES, etag_timeout=HUB_TIMEOUT_S)
    except Exception as e:  # offline, unknown or gated repo: one line, with the way out
        raise UserError(f"could not get {repo} from the Hugging Face Hub ({first_line(e)}): "
                        f"download it first with `hf download {repo}`, or set init_from to a local model "
                        "folder") from None


def load_pretrained(folder, config):
    return GPT2LMHeadModel.from_pretrained(folder, config=config, attn_implementation="sdpa")


def read_model_config(folder, where):
    """The GPT2Config of a model folder; anything but a GPT-2 there is a clear error."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError):
        raise UserError(f"{where} has no readable config.json: not a Hugging Face model folder") from None
    if model_type != "gpt2":
        raise UserError(f"{where} holds a {model_type!r} model; gpt-train trains GPT-2 (model_type 'gpt2')")
    return GPT2Config.from_pretrained(folder)


def settings_for_checkpoint(cfg, config, where, can_crop):
    """The settings with the checkpoint's shape: it decides, and explicit settings may not contradict it.

    block_size may be lowered below the checkpoint's context (the model is cropped, as in
    nanoGPT) but not raised; left unset it is the checkpoint's.
    """
    shape = {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
             "bias": getattr(config, "bias", True)}  # OpenAI's checkpoints have biases
    for name, theirs in shape.items():
        if name in cfg.explicit and getattr(cfg, name) != theirs:
            raise UserError(f"{where} has {name}={theirs} but the settings say {name}={getattr(cfg, name)}: "
                            f"drop the {name} setting (the model's shape comes from {where})")
    context = config.n_positions
    block_size = cfg.block_size if "block_size" in cfg.explicit else context
    if block_size > context:
        raise UserError(f"block_size={block_size} is larger than the {context}-token context of {where}: "
                        f"use block_size <= {context}")
    if block_size < context and not can_crop:
        raise UserError(f"{where} was trained with block_size={context}; resuming cannot change it to "
                        f"{block_size}: drop the block_size setting")
    return with_values(cfg, block_size=block_size, **shape)


def crop_block_size(model, block_size):
    """Cut the context to block_size, as nanoGPT's crop_block_size: keep the first position embeddings."""
    wpe = model.transformer.wpe
    if block_size >= wpe.num_embeddings:
        return model
    wpe.weight = torch.nn.Parameter(wpe.weight.detach()[:block_size].clone())
    wpe.num_embeddings = block_size
    model.config.n_positions = block_size  # GPT-2 in transformers 5 keeps no causal-mask buffer to cut
    return model


def count_parameters(model, non_embedding=True):
    """Trainable-size count as nanoGPT reports it: position embeddings excluded by default."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.transformer.wpe.weight.numel()
    return n


def make_optimizers(model, cfg, device_type):
    """nanoGPT's AdamW, weight decay on matrices and embeddings only; with optimizer='muon', torch's
    Muon takes the blocks' matrices (attention and MLP weights) and AdamW keeps the rest: the
    embeddings (the head is tied to them), LayerNorms and biases.

    Muon's learning rate is adjusted per matrix by torch's "match_rms_adamw" rule,
    0.2 * sqrt(max(rows, cols)): it treats a matrix and its transpose alike, so GPT-2's Conv1D
    layout (weights stored as in x out, not nn.Linear's out x in) changes nothing. Newton-Schulz
    orthogonalisation is transpose-symmetric too.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    muon = [p for name, p in named if cfg.optimizer == "muon" and p.dim() == 2 and name.startswith(BLOCKS)]
    rest = [p for _, p in named if not any(p is q for q in muon)]
    # One fused kernel for all tensors: on CPU too, where it took the optimizer step from 2.7 to
    # 1.0 ms of a 37 ms CPU-recipe step.
    optimizers = [torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "kind": "decay"},
                                     {"params": [p for p in rest if p.dim() < 2], "kind": "no_decay"}],
                                    lr=cfg.learning_rate, fused=device_type in FUSED_ADAMW_DEVICES)]
    if muon:
        muon_class = Float32Muon if device_type == "cpu" else torch.optim.Muon
        optimizers.append(muon_class([{"params": muon, "kind": "muon"}], lr=cfg.muon_learning_rate,
                                     adjust_lr_fn="match_rms_adamw"))
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
