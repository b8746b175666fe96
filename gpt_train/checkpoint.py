"""Checkpoints: out_dir is a Hugging Face model folder plus the state to resume training.

    out_dir/
      config.json, model.safetensors, generation_config.json, tokenizer files   <- the model
      training_config.json                                                      <- the run's settings
      training_state/   accelerator.save_state (model, optimizer, scheduler, scaler, RNGs)
                        trainer_state.json (iteration, best val loss, tracker run id)

The model part is what `from_pretrained`, `pipeline()` and the Hub take; training_state/
is what `init_from='resume'` needs on top. A save is written whole into a staging folder
inside out_dir and then moved into place, so an interrupted save never mixes the new and
the previous checkpoint. The loop's own state lives in JSON, not in pickles: Accelerate
reloads registered objects with `weights_only=False`.

Not here: what to save when (the loop decides), uploading (gpt_train.hub).
"""
import json
import logging
import os
import shutil

from transformers.utils import logging as hf_logging

from gpt_train.errors import UserError
from gpt_train.model_card import write_model_card

# Tied input/output embeddings are stored once; Accelerate warns about it at every save.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)

STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "training_config.json"
STAGING_DIR = ".checkpoint-staging"
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json")


def save_checkpoint(accelerator, model, tokenizer, out_dir, trainer_state):
    """Write model folder and training state; every process must call this (sharded states)."""
    staging = os.path.join(out_dir, STAGING_DIR)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(os.path.join(staging, STATE_DIR))
    state_dict = accelerator.get_state_dict(model)  # gathers a full state dict under FSDP
    if accelerator.is_main_process:
        hf_logging.disable_progress_bar()  # a per-save progress bar would drown the training log
        accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict)
        hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(staging)
        write_model_card(staging, trainer_state)
        _write_json(os.path.join(staging, STATE_DIR, TRAINER_STATE), trainer_state)
        _move_into_place(staging, out_dir)
    accelerator.wait_for_everyone()


def _move_into_place(staging, out_dir):
    """Replace the previous checkpoint with the staged one; the state folder goes last."""
    state_old = os.path.join(out_dir, STATE_DIR + ".old")
    for name in os.listdir(staging):
        if name != STATE_DIR:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    shutil.rmtree(state_old, ignore_errors=True)
    if os.path.exists(os.path.join(out_dir, STATE_DIR)):
        os.rename(os.path.join(out_dir, STATE_DIR), state_old)
    os.rename(os.path.join(staging, STATE_DIR), os.path.join(out_dir, STATE_DIR))
    shutil.rmtree(state_old, ignore_errors=True)
    os.rmdir(staging)


def read_trainer_state(out_dir):
    """The saved loop state of out_dir's checkpoint, or a clear error if there is none to resume."""
    path = os.path.join(out_dir, STATE_DIR, TRAINER_STATE)
    if not os.path.isfile(path):
        raise UserError(f"nothing to resume in {out_dir}: no {STATE_DIR}/{TRAINER_STATE} found. "
                        "Train with init_from='scratch' first, or point out_dir at a finished checkpoint")
    missing = [f for f in MODEL_FILES[:2] if not os.path.isfile(os.path.join(out_dir, f))]
    if missing:
        raise UserError(f"the checkpoint in {out_dir} is incomplete ({', '.join(missing)} missing): "
                        "it cannot be resumed")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({e}): the checkpoint cannot be resumed") from None


def load_training_state(accelerator, out_dir):
    accelerator.load_state(os.path.join(out_dir, STATE_DIR))


def write_run_config(out_dir, cfg_json):
    _write_json(os.path.join(out_dir, RUN_CONFIG), json.loads(cfg_json))


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
