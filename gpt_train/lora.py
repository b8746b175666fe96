"""LoRA fine-tuning through peft: low-rank adapters on a pretrained GPT-2, everything else frozen.

With finetune_method='lora' the run trains only the adapters, so the optimizer state is a
sliver of full fine-tuning's (two AdamW moments of every weight). Each checkpoint holds both:

    out_dir/            the merged model, a plain GPT-2 folder (sample.py, pipeline(), lm-eval, the Hub)
    out_dir/adapter/    the adapter alone, as peft writes it (PeftModel / AutoPeftModelForCausalLM)

The adapter's `base_model_name_or_path` names the model it adapts (a Hub id, or the folder's
absolute path): `AutoPeftModelForCausalLM.from_pretrained("out_dir/adapter")` finds it without
gpt-train, and a resume loads that base and the adapter on top, exactly as they were (the merged
weights are never unmerged: that would round).

GPT-2 keeps its projections in Conv1D (in x out), so the adapters are built with
fan_in_fan_out=True. Not here: when to save (gpt_train.train), the folder's other files
(gpt_train.checkpoint).
"""
import json
import os
import sys
import warnings

import torch
from safetensors import safe_open

from gpt_train.config import comma_names
from gpt_train.errors import UserError, first_line
from gpt_train.optim import OPTIMIZERS
from gpt_train.out_dir import ADAPTER_DIR, WEIGHTS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"  # peft's name for a model's one adapter


def check_settings(cfg):
    """What LoRA cannot do, refused before anything loads."""
    if cfg.init_from == "scratch":
        raise UserError("finetune_method='lora' adapts a trained model: set init_from to gpt2*, a Hub id or a "
                        "model folder")
    if not OPTIMIZERS[cfg.optimizer].trains_lora:
        lora_ones = " or ".join(repr(name) for name, facts in OPTIMIZERS.items() if facts.trains_lora)
        raise UserError(f"finetune_method='lora' trains its adapters with AdamW: set optimizer={lora_ones}")
    tied = {"wte", "lm_head"} & set(comma_names(cfg.lora_target_modules))
    if tied:
        raise UserError(f"lora_target_modules names {', '.join(sorted(tied))}: GPT-2 ties its embedding to its "
                        "output layer, which one adapter cannot update as one; target c_attn, c_proj, c_fc")


def base_source(init_from):
    """How the adapter names its base model: a Hub id as given, a local folder by absolute path."""
    return os.path.abspath(init_from) if os.path.isdir(init_from) else init_from


def saved_base(out_dir):
    """The base model a LoRA checkpoint in out_dir adapts, from its adapter_config.json."""
    path = os.path.join(out_dir, ADAPTER_DIR, ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            base = json.load(f)["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the LoRA checkpoint in {out_dir} has no readable {ADAPTER_DIR}/{ADAPTER_CONFIG} "
                        f"({e}): it cannot be resumed") from None
    if not isinstance(base, str) or not base:
        raise UserError(f"{path} names no base model (base_model_name_or_path): it cannot be resumed")
    return base


def add_adapters(model, cfg, base, saved_adapter=None):
    """The model with LoRA adapters, only they trainable: new ones from the settings, or for a
    resume those saved in `saved_adapter` (a folder), as they were."""
    from peft import LoraConfig, PeftModel, get_peft_model  # deferred: only LoRA runs pay for peft

    with warnings.catch_warnings():  # peft asks transformers 5 by a name it deprecates: noise in the run's log
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if saved_adapter:
            try:
                adapted = PeftModel.from_pretrained(model, saved_adapter, is_trainable=True)
            except (RuntimeError, ValueError) as e:  # a base of another shape than the adapter's
                raise UserError(f"the adapter in {saved_adapter} does not fit {base} ({first_line(e)}): resume "
                                "with the model it was trained on") from None
        else:
            targets = comma_names(cfg.lora_target_modules)
            config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                target_modules=targets, fan_in_fan_out=True, task_type="CAUSAL_LM")
            try:
                adapted = get_peft_model(model, config)
            except ValueError as e:  # peft names the targets it did not find
                raise UserError(f"lora_target_modules={cfg.lora_target_modules!r}: {e}") from None
    # peft would name the folder the weights were read from (a cache snapshot, a relative path)
    adapted.peft_config[ADAPTER_NAME].base_model_name_or_path = base
    return adapted


def check_base_unchanged(model, out_dir, base):
    """A resume's base plus its saved adapter must give the weights the checkpoint saved: a base that
    changed since (a folder trained further, a newer Hub revision) is refused, never trained on."""
    merged = merged_state_dict(model)
    with safe_open(os.path.join(out_dir, WEIGHTS), framework="pt") as saved:
        for name in saved.keys():
            if name in merged and not torch.allclose(saved.get_tensor(name), merged[name], rtol=1e-5, atol=1e-6):
                raise UserError(f"{base} is not the model the adapter in {out_dir} was trained on ({name} differs "
                                "from the checkpoint's merged weights): restore that model, or start a new run")


def is_adapted(model):
    # a model is a PeftModel only once peft is imported: a run without LoRA never imports it (~1.4 s)
    return "peft" in sys.modules and isinstance(model, sys.modules["peft"].PeftModel)


def merged_state_dict(model):
    """The base model's weights with each adapter's update added, under the plain GPT-2 names:
    what peft's merge_and_unload gives, without changing the model being trained."""
    from peft.tuners.lora import LoraLayer  # deferred (add_adapters): imported already where adapters exist

    base = model.get_base_model()
    adapted = {f"{name}.weight": module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    merged = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        if name in adapted:
            tensor = tensor + adapted[name].get_delta_weight(ADAPTER_NAME).to(tensor.dtype)
        merged[name] = tensor.detach()
    return merged


def trainable_summary(model):
    trainable, total = model.get_nb_trainable_parameters()
    return f"LoRA trains {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
