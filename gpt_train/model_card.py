"""The model card (README.md) written into every checkpoint folder, for people and for the Hub.

It says what the folder holds and how it was made: the dataset, the training progress at
this checkpoint (iteration, tokens seen, best val loss) and the resolved training settings,
with Hub metadata so the Hub lists it as a transformers text-generation model.

Not here: writing the rest of the folder (gpt_train.checkpoint) or uploading it (gpt_train.hub).
"""
import json
import math
import os

from huggingface_hub import ModelCard, ModelCardData

from gpt_train.data import bits_per_byte
from gpt_train.out_dir import MODEL_CARD


def write_model_card(folder, trainer_state):
    """Write folder/README.md from the checkpoint's TrainerState (iteration, tokens, best val loss, settings)."""
    ModelCard(render(trainer_state)).save(os.path.join(folder, MODEL_CARD))


def render(trainer_state):
    cfg = trainer_state.config
    dataset = os.path.basename(os.path.normpath(cfg["data_dir"])) if cfg.get("data_dir") else cfg["dataset"]
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["gpt2", "gpt-train", dataset])
    best = trainer_state.best_val_loss
    best_text = f"{best:.4f}" if math.isfinite(best) else "not evaluated yet"
    if math.isfinite(best) and trainer_state.val_bytes_per_token:
        best_text += f" ({bits_per_byte(best, trainer_state.val_bytes_per_token):.4f} bits per byte of val text)"
    if math.isfinite(best) and trainer_state.best_iter is not None:
        best_text += f", at iteration {trainer_state.best_iter:,}"
    if trainer_state.val_loss is not None:
        these = f"{trainer_state.val_loss:.4f}"
    elif trainer_state.stopped_by:
        these = f"not evaluated: saved when the run was stopped ({trainer_state.stopped_by})"
    else:
        these = "not evaluated"
    shape = f"{cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide, context {cfg['block_size']}"
    source = {"scratch": "trained from scratch", "resume": "trained (a resumed run)"}.get(
        cfg["init_from"], f"fine-tuned from {cfg['init_from']}")
    return f"""---
{data.to_yaml()}
---

# {os.path.basename(os.path.abspath(cfg["out_dir"]))}

A GPT-2 ({shape}) {source} on the `{dataset}` dataset with gpt-train
(nanoGPT's training recipe on the Hugging Face stack).

| at this checkpoint | |
| --- | --- |
| dataset | `{dataset}` |
| iteration | {trainer_state.iter_num:,} |
| tokens seen | {trainer_state.tokens_seen:,} |
| val loss of these weights | {these} |
| best val loss of the run | {best_text} |

## Use

```python
from transformers import pipeline
generator = pipeline("text-generation", model="path/or/hub-id/of/this/folder")
print(generator("ROMEO:")[0]["generated_text"])
```

The folder's generation defaults sample as nanoGPT's sample.py does (temperature 0.8, top_k 200)
and stop at the context ({cfg["block_size"]} tokens, prompt included; pass `max_length` to stop
sooner). For longer text use gpt-train's `sample.py`, which slides the context as nanoGPT does.

## Training settings

```json
{json.dumps(cfg, indent=2)}
```
"""
