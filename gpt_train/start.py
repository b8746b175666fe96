"""What kind of start a training run is, decided in one place: scratch, a resume, a worker group
restarted under --max_restarts, an overwrite, an evaluation, a pretrained folder.

`plan` is nanoGPT's `init_from` chain: it returns the run's final settings (a resume's saved
ones under what the command line changes; a loaded model's shape), the processes and their
precision, out_dir's lock, the saved state, the folder the weights come from and whether the
run may replace another's files. Every rewrite of the settings happens here, and every refusal
of settings that do not run together (`check_together`). The loop takes it from there.

Not here: building the model and data (gpt_train.train), writing out_dir (gpt_train.checkpoint).
"""
import contextlib
import os
from dataclasses import dataclass, field, fields

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from gpt_train import checkpoint, run_lock
from gpt_train.cli import check_type
from gpt_train.config import TOKENS_PER_ITER, TrainConfig, tokens_per_iter, with_values
from gpt_train.device import check_one_run, mixed_precision, process_group_kwargs
from gpt_train.errors import UserError
from gpt_train.launch import launched_with_fsdp
from gpt_train.lora import ADAPTER_CONFIG, base_source, saved_base
from gpt_train.lora import check_settings as check_lora_settings
from gpt_train.model import pretrained_folder, read_model_config
from gpt_train.optim import OPTIMIZERS
from gpt_train.store import LocalHome, home_of, is_url
from gpt_train.out_dir import (ADAPTER_DIR, BEFORE_FIRST_CHECKPOINT, RUN_CONFIG, STATE_DIR, TRAINER_STATE,
                               check_model_files, has_checkpoint, previous_run, read_run_config)


@dataclass
class Start:
    """Everything the kind of start decides, for `setup` to build on."""

    cfg: object  # the final settings
    processes: PartialState
    lock: run_lock.OutDirLock | None = None  # out_dir held for this run (main process; an evaluation has none)
    home: object = field(default_factory=LocalHome)  # where out_dir lives: this disk or a store (gpt_train.store)
    saved: object = None  # the TrainerState a resume continues
    folder: str | None = None  # where the weights come from: out_dir, a pretrained folder, or None (scratch)
    model_config: object = None  # that folder's GPT2Config
    base: str | None = None  # LoRA: the model its adapter adapts, as the adapter names it (gpt_train.lora)
    base_folder: str | None = None  # LoRA: where that model's frozen weights come from
    adapter: str | None = None  # LoRA resume: the saved adapter folder
    replace: bool = False  # another run's files in out_dir may be removed
    mixed: str | None = None  # Accelerate's mixed precision for the device ("no", "bf16", "fp16"; None: the YAML's)
    fsdp: bool = False  # launched with an FSDP config
    changes: list = field(default_factory=list)  # what the command line changes in a resumed run, one line each

    @property
    def where(self):
        """The model's origin as the user named it, for messages."""
        return self.cfg.out_dir if self.saved else self.cfg.init_from

    @property
    def writes(self):
        return not self.cfg.eval_only  # an evaluation leaves out_dir as it was

    @property
    def judged(self):
        """The folder lm-eval judges (lm_eval_tasks): the run's out_dir after each save, or the model
        an evaluation reads (None for a scratch model: nothing to load)."""
        return self.cfg.out_dir if self.writes else self.folder

    def release(self):
        if self.lock:
            self.lock.release()

    @contextlib.contextmanager
    def released_on_error(self):
        """Let go of out_dir if what is built on this start fails: the run never began."""
        try:
            yield
        except BaseException:
            self.release()
            raise


def plan(cfg):
    """The start, decided once: settings, processes, out_dir's lock, saved state and model source.

    Settings come first (a resume's device and timeout decide the processes); the lock before
    anything reads a checkpoint it may repair or checks that out_dir is free, so two runs
    started together cannot both pass.
    """
    cfg, home = _out_dir_home(cfg)
    with home.naming():
        return _plan(cfg, home)


def _plan(cfg, home):
    changes = []
    cfg = _resume_choice(cfg)
    if cfg.init_from == "resume":  # the run's own settings, changed only where the user says so
        cfg, changes = with_saved_settings(cfg, read_run_config(cfg.out_dir), os.path.join(cfg.out_dir, RUN_CONFIG))
    elif cfg.finetune_method == "lora":
        check_lora_settings(cfg)
    if cfg.lora_base and cfg.finetune_method != "lora":
        raise UserError(f"lora_base={cfg.lora_base!r} names a LoRA run's base, and this run trains every weight "
                        "(finetune_method='full'): leave it out")
    processes = PartialState(**process_group_kwargs(cfg.device, cfg.backend, cfg.ddp_timeout))
    check_one_run(processes)
    home.check_processes(processes)
    mixed, fsdp = mixed_precision(cfg.dtype, processes.device), launched_with_fsdp()  # a dtype the device lacks
    check_together(cfg, mixed, fsdp)
    start = Start(cfg, processes, changes=changes, lock=_hold_out_dir(cfg, processes, home), home=home, mixed=mixed,
                  fsdp=fsdp)
    with start.released_on_error():
        if start.writes and cfg.init_from != "resume" and not cfg.overwrite_output_dir:
            _refuse_another_run(cfg)
        if cfg.init_from == "resume":
            start.saved = checkpoint.read_trainer_state(cfg.out_dir, repair=start.writes)
            start.folder = cfg.out_dir
        elif cfg.init_from != "scratch":
            with processes.main_process_first():  # one process downloads, the others find it cached
                start.folder = pretrained_folder(cfg.init_from)
            check_model_files(start.folder)
        if cfg.finetune_method == "lora":
            _plan_lora(start)
        if start.folder:
            start.model_config = read_model_config(start.folder, start.where)
            start.cfg = settings_for_checkpoint(cfg, start.model_config, start.where, can_crop=start.saved is None)
    start.replace = cfg.init_from != "resume" and (cfg.overwrite_output_dir or cfg.resume_from_checkpoint is True)
    return start


def check_together(cfg, mixed, fsdp):
    """What does not run together, refused before anything loads: an optimizer's, LoRA's and the
    batch probe's limits under FSDP, chunked_loss under float16. LoRA's own limits:
    gpt_train.lora.check_settings."""
    if cfg.async_save and fsdp:
        raise UserError("async_save copies the whole training state to this machine's memory, and under FSDP each "
                        "process writes its own shard with torch.distributed.checkpoint: set async_save=False")
    if cfg.chunked_loss and mixed == "fp16":  # dtype='auto' on a GPU without bf16 (T4, V100) too
        raise UserError("chunked_loss computes its gradients before float16's loss scaling, where they underflow: use "
                        "--dtype=bfloat16 or --dtype=float32, or leave chunked_loss off")
    if not fsdp:
        return
    refusal = OPTIMIZERS[cfg.optimizer].not_under_fsdp
    if refusal:
        raise UserError(f"optimizer={cfg.optimizer!r} does not run under FSDP: {refusal}")
    if cfg.auto_find_batch_size:
        raise UserError("auto_find_batch_size does not run under FSDP (its forward gathers weights across processes, "
                        "where one process's out-of-memory error would stall the rest): set batch_size")
    if cfg.finetune_method == "lora":
        raise UserError("finetune_method='lora' does not run under FSDP here: LoRA's optimizer state is small "
                        "enough for DDP (accelerate_configs/8xa100.yaml) or one GPU")


def _plan_lora(start):
    """LoRA's frozen base: init_from's model; for a resume, the model its adapter names, with the
    saved adapter on top (out_dir's own weights are merged ones, which never unmerge exactly)."""
    cfg = start.cfg
    if not start.saved:
        if cfg.lora_base:
            raise UserError(f"lora_base={cfg.lora_base!r} points a resumed LoRA run at its moved base; a new run "
                            "adapts init_from's model: leave lora_base out")
        start.base, start.base_folder = base_source(cfg.init_from), start.folder
        return
    start.adapter = os.path.join(cfg.out_dir, ADAPTER_DIR)
    if cfg.lora_base:  # checked against the checkpoint's merged weights once loaded (train.build)
        start.base, where = base_source(cfg.lora_base), "lora_base"
    else:
        start.base, where = saved_base(cfg.out_dir), f"the LoRA base ({ADAPTER_DIR}/{ADAPTER_CONFIG}'s " \
                                                     "base_model_name_or_path)"
    with start.processes.main_process_first():
        try:
            start.base_folder = pretrained_folder(start.base, where)
        except UserError as e:
            if cfg.lora_base:
                raise
            raise UserError(f"{e}; if the base moved, say where it is now with --lora_base=PATH") from None
    check_model_files(start.base_folder)


def _out_dir_home(cfg):
    """out_dir on a store (a URL): the run works in its local copy, brought up to date with the store
    first (gpt_train.store); resume_from_checkpoint=URL continues the run there."""
    target = cfg.resume_from_checkpoint
    if isinstance(target, str) and is_url(target):
        cfg = with_values(cfg, out_dir=target)
    home = home_of(cfg.out_dir)
    if isinstance(home, LocalHome):
        return cfg, home
    if isinstance(target, str) and is_url(target):
        cfg = with_values(cfg, resume_from_checkpoint=home.folder)
    return with_values(cfg, out_dir=home.folder), home


def _hold_out_dir(cfg, processes, home):
    """The run's lock on out_dir, taken by the main process for all of them (for a store, its lease
    too); every process learns the outcome. An evaluation writes nothing and takes none."""
    if cfg.eval_only:
        return None
    lock, refusal = None, None
    if processes.is_main_process:
        try:
            lock = home.hold(cfg.out_dir)
        except UserError as e:
            refusal = str(e)
    if processes.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise UserError(refusal)
    return lock


def _resume_choice(cfg):
    """resume_from_checkpoint as init_from: 'resume' where there is a checkpoint to continue.

    Every process decides alone, from the files, before any of them can change out_dir: a
    restarted worker group (torchrun --max_restarts) thus continues as one run.
    """
    target = cfg.resume_from_checkpoint
    if isinstance(target, str) and target:
        if not has_checkpoint(target):
            raise UserError(f"resume_from_checkpoint={target!r}: no checkpoint there to continue (no "
                            f"{STATE_DIR}/{TRAINER_STATE}); give the out_dir of a run, or True to start when "
                            "there is none")
        return with_values(cfg, out_dir=target, init_from="resume")
    if target is True and has_checkpoint(cfg.out_dir):
        return with_values(cfg, init_from="resume")
    return cfg


def _refuse_another_run(cfg):
    # a worker restarted before the first checkpoint replaces what its own first attempt left
    restarting = cfg.resume_from_checkpoint is True
    found = previous_run(cfg.out_dir, allow=BEFORE_FIRST_CHECKPOINT if restarting else ())
    if found:
        raise UserError(f"{cfg.out_dir} holds another training run ({found}): continue it with --init_from=resume, "
                        "train into another --out_dir, or replace it with --overwrite_output_dir=True")


# Settings a resumed run takes from the command line only: they say what to do with the run.
NOT_RESUMED = ("init_from", "out_dir", "eval_only", "overwrite_output_dir", "resume_from_checkpoint",
               "stream_allow_changed", "lora_base")
# Settings whose change makes a resumed run differ from the uninterrupted one.
TRAJECTORY = ("dataset", "data_dir", "gradient_accumulation_steps", "batch_size", "block_size", "dropout",
              "learning_rate", "weight_decay", "beta1", "beta2", "grad_clip", "skip_nonfinite_steps", "decay_lr",
              "warmup_iters", "lr_decay_iters", "min_lr", "seed", "dtype", "optimizer", "muon_learning_rate",
              "muon_momentum", "lr_schedule", "cooldown_iters")


# Settings a resume cannot change: what the saved optimizer state, adapter and stream position were built for.
FIXED = ("optimizer", "finetune_method", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
         "stream_from", "stream_subset", "stream_text_column", "stream_val_documents", "tokenizer")
DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}  # what runs saved before a setting existed had


def with_saved_settings(cfg, saved, source):
    """Resume's settings: the saved run's (read from the file `source`), except what presets or
    the command line set. A saved value of the wrong type or out of range is a one-line error.

    Returns (settings, [one line per setting the command line changes]).
    """
    types = {f.name: f.type for f in fields(cfg)}
    saved = {k: check_type(k, v, types[k], source) for k, v in saved.items() if k in types}
    inherited = {k: v for k, v in saved.items() if k not in cfg.explicit and k not in NOT_RESUMED}
    try:
        new = with_values(cfg, **inherited).validate()
    except UserError as e:
        raise UserError(f"{e} (from {source})") from None
    for name in FIXED:
        if saved.get(name, DEFAULTS[name]) != getattr(new, name):
            raise UserError(f"the run in {cfg.out_dir} trains with {name}={saved.get(name, DEFAULTS[name])!r}; a "
                            f"resume cannot change it: start a new run from its weights with --init_from={cfg.out_dir} "
                            "--out_dir=NEW_DIR")
    changes = []
    for name in sorted(cfg.explicit & saved.keys() - set(NOT_RESUMED)):
        if saved[name] == getattr(new, name):
            continue
        line = f"resume changes {name}: {saved[name]!r} -> {getattr(new, name)!r}"
        if name in TRAJECTORY:
            line += "; the run will not continue exactly as it would have"
        changes.append(line)
    before = tokens_per_iter({name: saved.get(name, getattr(new, name)) for name in TOKENS_PER_ITER})
    after = tokens_per_iter(new)
    if before != after:
        changes.append(f"resume changes the tokens per iteration: {before:,} -> {after:,}")
    return new, changes


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
