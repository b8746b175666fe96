"""What a training run holds in memory at its peak, estimated from its settings before anything
loads, and what would fit where it does not.

The estimate is weights + gradients + optimizer state + the activations of one micro-batch.
Gradients are counted whole: from the second micro-step of an accumulating step on they are held
while a forward runs (with one micro-step per step it overestimates by up to them). Activations
are counted for an eager step in bytes per token and width, from the tensors a GPT-2 block keeps
for its backward; the constants below were measured on CPU with torch's MemTracker and are checked
against it (tests/test_memory.py; `python benchmarks/memory_estimate.py` prints the comparison).
torch.compile fuses elementwise ops and the loss and needs less (GPT-2 124M at 12 x 1024 tokens,
bf16: ~9.1 GB measured compiled on an H200, ~13.9 GB estimated here for an eager step).

Not here: the device's free memory and the settings (gpt_train.device, gpt_train.config), each
optimizer's state size (gpt_train.optim's table).
"""
import dataclasses
import math

import torch

from gpt_train.config import comma_names
from gpt_train.errors import UserError
from gpt_train.loss import chunk_tokens
from gpt_train.optim import OPTIMIZERS

GB = 1e9
FLOAT32 = 4
# Activations kept for backward, in bytes per token and per unit of width, by compute dtype
# (None: float32). A block keeps ~16 tensors of its width (LayerNorm inputs and outputs, q/k/v, the
# attention output, the MLP's 4x-wide input and GELU output): 4 bytes each in float32; under
# autocast matmul outputs are 2 bytes and LayerNorms' and the residual stream's stay 4.
BLOCK_BYTES = {None: 64, torch.bfloat16: 36, torch.float16: 36}
EMBEDDING_BYTES = {None: 16, torch.bfloat16: 12, torch.float16: 12}  # embeddings and the final LayerNorm
DROPOUT_BYTES = 10  # a block's dropout masks and outputs
# The loss: per token and vocabulary entry, log-softmax's float32 output and two float32 gradients
# of that size at the start of backward (whatever the compute dtype: the loss upcasts the logits).
LOGIT_BYTES = 12
# chunked_loss (gpt_train.loss): per token of one chunk and vocabulary entry, its float32 logits
# (turned into their gradient in place) and logsumexp's temporary, and under autocast the 16-bit
# logits and gradient; besides, the gradients it keeps for backward, the LM head's (float32) and
# the hidden states' (the compute dtype).
CHUNK_LOGIT_BYTES = {None: 8, torch.bfloat16: 12, torch.float16: 12}
# Without CUDA's fused attention kernels, attention with dropout falls back to SDPA's math path,
# which keeps the scores, their dropout mask and the dropped scores: per head and query-key pair.
ATTENTION_SCORE_BYTES = 12
CHECKPOINTED_BLOCK_BYTES = FLOAT32  # gradient checkpointing keeps each block's input (the residual stream)
WEIGHT_CAST_BYTES = 2  # autocast's 16-bit copy of each matmul weight, kept for backward
LORA_WIDTHS = {"c_attn": 1 + 3, "c_proj": (1 + 1) + (4 + 1), "c_fc": 1 + 4}  # in + out, in units of n_embd
LORA_INPUT_WIDTHS = {"c_attn": 1, "c_proj": 1 + 4, "c_fc": 1}  # the adapted modules' inputs (c_proj: twice)
LORA_DROPOUT_BYTES = 4 + 1  # lora_dropout keeps a float32 copy of each adapted input and its mask


@dataclasses.dataclass(frozen=True)
class Need:
    """Bytes at the peak, by what holds them."""
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the estimate depends on: the settings (TrainConfig: shape, batch, optimizer, method) and
    where they run."""
    cfg: object
    vocab_size: int
    device_type: str
    compute_dtype: object  # torch.bfloat16/float16 under mixed precision, None for float32
    processes: int = 1
    shards: int = 1  # FSDP shards weights, gradients and optimizer state over the processes
    training: bool = True

    def but(self, **settings):
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, **settings))


def parameters(cfg, vocab_size):
    """(all, trained): GPT-2's parameter count for the shape, and how many of them train."""
    L, H = cfg.n_layer, cfg.n_embd
    total = 12 * L * H * H + 13 * L * H + (vocab_size + cfg.block_size) * H + 2 * H
    if cfg.finetune_method != "lora":
        return total, total
    targets = set(comma_names(cfg.lora_target_modules))
    return total, L * cfg.lora_r * H * sum(LORA_WIDTHS.get(name, 0) for name in targets)


def estimate(work):
    """The Need of one process."""
    cfg = work.cfg
    total, trained = parameters(cfg, work.vocab_size)
    weights = total * FLOAT32 / work.shards
    if not work.training:
        return Need(weights, 0, 0, _activations(work, evaluation=True))
    gradients = trained * FLOAT32 / work.shards
    if work.processes > 1 and work.shards == 1:
        gradients *= 2  # DDP's buckets hold a copy of the gradients for the all-reduce
    facts = OPTIMIZERS[cfg.optimizer]  # its state per parameter, per block matrix where that differs
    optimizer = trained * facts.state_bytes
    if facts.matrix_state_bytes is not None and cfg.finetune_method == "full":
        optimizer += 12 * cfg.n_layer * cfg.n_embd ** 2 * (facts.matrix_state_bytes - facts.state_bytes)
    optimizer /= work.shards
    return Need(weights, gradients, optimizer, _activations(work))


def _activations(work, evaluation=False):
    cfg, dtype = work.cfg, work.compute_dtype
    tokens, width = cfg.batch_size * cfg.block_size, cfg.n_embd
    block = BLOCK_BYTES[dtype] + (DROPOUT_BYTES if cfg.dropout and not evaluation else 0)
    if evaluation:  # nothing kept for a backward: one block's tensors and the loss at a time
        return tokens * width * block + _loss(work, tokens, evaluation=True)
    kept = cfg.n_layer * block if not cfg.gradient_checkpointing else \
        cfg.n_layer * CHECKPOINTED_BLOCK_BYTES + block  # and one block's own, recomputed
    need = tokens * width * (kept + EMBEDDING_BYTES[dtype]) + _loss(work, tokens)
    if cfg.dropout and work.device_type != "cuda":
        layers = 1 if cfg.gradient_checkpointing else cfg.n_layer
        need += cfg.batch_size * cfg.n_head * cfg.block_size ** 2 * layers * ATTENTION_SCORE_BYTES
    if cfg.finetune_method == "lora" and cfg.lora_dropout:
        widths = sum(LORA_INPUT_WIDTHS.get(name, 0) for name in set(comma_names(cfg.lora_target_modules)))
        need += tokens * width * widths * cfg.n_layer * LORA_DROPOUT_BYTES
    if dtype is not None:  # checkpointed blocks keep theirs only while one is recomputed
        blocks = 1 if cfg.gradient_checkpointing else cfg.n_layer
        need += (12 * blocks * width ** 2 + work.vocab_size * width) * WEIGHT_CAST_BYTES
    return need


def _loss(work, tokens, evaluation=False):
    cfg, vocab = work.cfg, work.vocab_size
    if not cfg.chunked_loss:
        return tokens * vocab * LOGIT_BYTES
    need = min(tokens, chunk_tokens(vocab)) * vocab * CHUNK_LOGIT_BYTES[work.compute_dtype]
    if not evaluation:  # the LM head's gradient, unless LoRA freezes it, and the hidden states'
        head = vocab * cfg.n_embd * FLOAT32 if cfg.finetune_method != "lora" else 0
        need += head + tokens * cfg.n_embd * (2 if work.compute_dtype else FLOAT32)
    return need


def describe(need, work):
    """The Need in a few words, for the start line and the refusal."""
    cfg = work.cfg
    parts = [f"weights {need.weights / GB:,.1f}"]
    if work.training:
        parts += [f"gradients {need.gradients / GB:,.1f}",
                  f"{OPTIMIZERS[cfg.optimizer].label} state {need.optimizer / GB:,.1f}"]
    parts.append(f"activations {need.activations / GB:,.1f} GB at {cfg.batch_size:,} x {cfg.block_size:,} "
                 "tokens per micro-batch")
    return f"~{need.total / GB:,.1f} GB at the peak ({', '.join(parts)})"


def alternatives(work, free, pretrained, resumed):
    """The settings that would fit in `free` bytes, each with its estimate: single changes first;
    if none fits alone, all of them together. A resume keeps its method and optimizer."""
    cfg, changes = work.cfg, []
    new_state = work.training and not resumed and work.shards == 1
    if new_state and pretrained and cfg.finetune_method == "full" and OPTIMIZERS[cfg.optimizer].trains_lora:
        changes.append({"finetune_method": "lora"})
    if new_state:  # an optimizer of smaller state that stands in for this one, where it runs
        changes += [{"optimizer": name} for name, facts in OPTIMIZERS.items()
                    if facts.saves_memory_over == cfg.optimizer and work.device_type in (facts.devices or
                                                                                       (work.device_type,))]
    if work.training and not cfg.gradient_checkpointing:
        changes.append({"gradient_checkpointing": True})
    if not cfg.chunked_loss and chunk_tokens(work.vocab_size) < cfg.batch_size * cfg.block_size:
        changes.append({"chunked_loss": True})
    fits = [(change, need) for change in changes if (need := estimate(work.but(**change)).total) <= free]
    smaller = _smaller_batch(work, free)
    if smaller:
        fits.append(smaller)
    if not fits and changes:
        together = {k: v for change in changes for k, v in change.items()}
        smallest = _smaller_batch(work.but(**together), free)
        if smallest:
            fits.append(({**together, **smallest[0]}, smallest[1]))
    return fits


def _smaller_batch(work, free):
    """The largest micro-batch under the current one that fits, with the accumulation that keeps the
    tokens per step (gradient_accumulation_steps stays a multiple of the processes); None if none."""
    cfg = work.cfg
    one, two = (estimate(work.but(batch_size=rows)).total for rows in (1, 2))
    per_row = two - one  # the estimate grows linearly with the micro-batch
    largest = min(cfg.batch_size - 1, int((free - (one - per_row)) // per_row)) if per_row > 0 else cfg.batch_size - 1
    rows = cfg.batch_size * cfg.gradient_accumulation_steps  # per step, all processes together
    batches = sorted({d for i in range(1, math.isqrt(rows) + 1) if rows % i == 0 for d in (i, rows // i)},
                     reverse=True)
    for batch in batches:
        if batch <= largest and (rows // batch) % work.processes == 0:
            change = {"batch_size": batch, "gradient_accumulation_steps": rows // batch}
            return change, estimate(work.but(**change)).total
    return None


def check_fits(work, free, device_name, pretrained, resumed, smaller_batch_ok=False):
    """Refuse, in one line, a run whose estimated peak exceeds `free` bytes, naming what would fit;
    else return the estimate's description. `smaller_batch_ok` (auto_find_batch_size): a run
    that would fit with a smaller micro-batch goes ahead, and its probe finds which."""
    need = estimate(work)
    if need.total <= free:
        return describe(need, work)
    smaller = _smaller_batch(work, free) if smaller_batch_ok else None
    if smaller:
        return (f"{describe(need, work)}, more than is free; auto_find_batch_size will try smaller micro-batches "
                f"(~{smaller[1] / GB:,.1f} GB at {smaller[0]['batch_size']})")
    fits = alternatives(work, free, pretrained, resumed)
    if fits:
        advice = "these would fit: " + "; ".join(
            " ".join(f"--{k}={v}" for k, v in change.items()) + f" (~{total / GB:,.1f} GB)" for change, total in fits)
    else:
        advice = ("no setting here fits it: shard it over several GPUs with FSDP (accelerate_configs/fsdp_8xa100.yaml) "
                  "or train a smaller model")
    compiled = " (for an eager step; torch.compile's needs less)" if work.cfg.compile else ""
    raise UserError(f"this run needs {describe(need, work)}{compiled} but {device_name} has {free / GB:,.1f} GB free; "
                    f"{advice}; --memory_check=False runs it anyway")
