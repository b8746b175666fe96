"""The model: GPT2LMHeadModel built from settings or loaded, its generation defaults and FLOPs.

nanoGPT's GPT and transformers' GPT-2 are the same network. Their initialisations match
too (normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)), so a scratch
model here starts where nanoGPT's would. Two differences are bridged in this module:
nanoGPT trains with exact GELU (GPT-2 checkpoints keep their tanh GELU), and nanoGPT's
`bias=False` has no biases at all, which GPT-2 cannot express; zero biases that never train
compute the same function and keep the folder a plain GPT-2.

Not here: optimizers and the learning-rate schedule (gpt_train.optim), the training loop, saving
and resuming (gpt_train.checkpoint).
"""
import json
import os

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils import logging as hf_logging

from gpt_train.errors import UserError, first_line
from gpt_train.store import is_url, model_folder

VOCAB_MULTIPLE = 64  # vocabularies rounded up to a multiple of it, as nanoGPT does for GPT-2: faster matmuls
PADDED_GPT2_VOCAB = 50304  # GPT-2's 50,257, so rounded

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


def pretrained_folder(name, setting="init_from"):
    """The local folder holding the model `name`: a folder as given, or the Hub snapshot in the HF
    cache. `setting`: how the user gave it (init_from, tokenizer_from, ...), for the messages.

    A cached snapshot is used without asking the network. Otherwise the files are downloaded
    (config, safetensors weights and tokenizer only, not the TF/Flax/ONNX copies the OpenAI
    repos also hold); with no network this fails within seconds with what to do instead.
    """
    if os.path.isdir(name):
        return name
    if is_url(name):  # a run folder on object storage: its newest checkpoint's model, cached here
        return model_folder(name, setting)
    repo = GPT2_HUB_IDS.get(name, name)
    if name.startswith((".", "/", "~")) or os.path.splitext(name)[1]:
        raise UserError(f"{setting}={name!r}: model folder not found")
    try:
        return snapshot_download(repo, allow_patterns=HUB_FILES, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    except ValueError:  # not a valid repo id
        kinds = "'scratch', 'resume', " if setting == "init_from" else ""
        raise UserError(f"{setting}={name!r} is neither {kinds}a local model folder nor a Hub model id") from None
    try:
        return snapshot_download(repo, allow_patterns=HUB_FILES, etag_timeout=HUB_TIMEOUT_S)
    except Exception as e:  # offline, unknown or gated repo: one line, with the way out
        raise UserError(f"could not get {repo} ({setting}) from the Hugging Face Hub ({first_line(e)}): "
                        f"download it first with `hf download {repo}`, or set {setting} to a local model "
                        "folder") from None


def load_pretrained(folder, config):
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar at every start and resume is noise
    try:
        return GPT2LMHeadModel.from_pretrained(folder, config=config, attn_implementation="sdpa")
    finally:
        if shown:
            hf_logging.enable_progress_bar()


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


def flops_per_token(model):
    """Training FLOPs per token (forward and backward), PaLM appendix B as in nanoGPT."""
    c = model.config
    return 6 * count_parameters(model) + 12 * c.n_layer * c.n_embd * c.n_positions
