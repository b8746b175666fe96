"""Checkpoints: writing out_dir's model folder and training state safely, and reading them back.

out_dir's layout (gpt_train.out_dir) is a Hugging Face model folder plus training_state/:
accelerator.save_state (optimizer, scheduler, scaler, RNGs; under FSDP also each process's shard
of the model) and trainer_state.json (the loop's state and the checkpoint's manifest). The model
part is what `from_pretrained`, `pipeline()` and the Hub take; training_state/ is what
`init_from='resume'` needs on top. Without FSDP the weights are stored once, in the
model folder, which resume loads (a second copy in training_state/ would double the
checkpoint's weight I/O: 6 GB more per gpt2-xl save). The loop's own state lives in JSON, not in
pickles: Accelerate reloads registered objects with `weights_only=False`.

A save is crash-safe. It is written whole into `.checkpoint-staging/` and flushed to disk;
one rename to `.checkpoint-committed/` is the commit point; then its files replace the
previous ones (each file atomically, training_state/ as one folder). A crash before the
commit leaves the previous checkpoint untouched (the staging folder is discarded later); a
crash after it is rolled forward by `recover`, which resume runs first. trainer_state.json
lists every file of its checkpoint with its size and sha256, the training state's too, so
resume refuses a checkpoint that is partial, corrupt or mixed with another (Accelerate itself
skips an unreadable RNG file with a note at INFO level: the run would go on, inexactly).

Not here: what to save when (the loop decides), uploading (gpt_train.hub).
"""
import contextlib
import functools
import logging
import os
import pickle
import shutil

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, gather_object
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from transformers.utils import logging as hf_logging

from gpt_train.errors import UserError, first_line
from gpt_train.files import (WRITE_FAILURES, describe_write_failure, file_problem, give_default_mode, manifest,
                             remove_path, write_json)
from gpt_train.model import COMPILED_PREFIX
from gpt_train.metrics import drop_records_from, drop_torn_last_line
from gpt_train.model_card import write_model_card
from gpt_train.lora import is_adapted, merged_state_dict
from gpt_train.out_dir import (ADAPTER_DIR, ATOMIC_TEMPORARY, COMMITTED_DIR, HUB_EVAL_RESULTS, METRICS, OLD_SUFFIX,
                               RUN_CONFIG, SAVED_FOLDERS_OLD, STAGING_DIR, STATE_DIR, TRAINER_STATE, TrainerState,
                               check_model_folder, last_checkpoint_note, written_by_gpt_train)
from gpt_train.tokenizer import save_tokenizer

# Tied input/output embeddings are stored once; Accelerate warns about it at every save.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)

DAMAGED_STATE = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError,
                 CheckpointException)
FSDP_MODEL_STATE = "pytorch_model_fsdp"  # how Accelerate names an FSDP model state (sharded folder or full file)


def store_weights_once(accelerator):
    """Without FSDP, keep the model's weights out of training_state/: resume reads the model folder.

    Under FSDP each process saves its own shard there (parallel, no gather), so it stays.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def save_checkpoint(accelerator, model, tokenizer, out_dir, trainer_state, process_state=None, later=False):
    """Write model folder and training state; every process must call this (sharded states).
    `process_state(folder)`: what else each process writes into training_state/ (a stream's place).

    `later` (async_save): the main process copies what it would write to host memory and returns
    the rest of the save (the writes, the manifest, the commit) as a function for another thread;
    the other processes' parts (their RNG states, a stream's place) are small and written now.
    Otherwise the checkpoint is committed on return, which returns None."""
    main = accelerator.is_main_process
    staging = os.path.join(out_dir, STAGING_DIR)
    if main:
        recover(out_dir)  # a save killed earlier is finished or discarded before we start
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    deferred = [] if later and main else None

    # every process writes its part of the training state, then the main process the model folder
    def write_state():
        with _writes_deferred(deferred):  # Accelerate decides what is saved; with `later`, not when
            accelerator.save_state(os.path.join(staging, STATE_DIR))
        if process_state:
            process_state(os.path.join(staging, STATE_DIR))

    _write_on_every_process(accelerator, out_dir, write_state)
    state_dict = _full_state_dict(accelerator, model)
    unwrapped, rest = accelerator.unwrap_model(model, keep_torch_compile=False), None

    def write_folder():
        nonlocal rest
        plain, weights = _model_to_write(unwrapped, state_dict, staging)
        if deferred is None:
            _write_model_folder(plain, weights, tokenizer, staging, trainer_state)
        else:
            rest = functools.partial(_finish_later, deferred, plain, to_host(weights), tokenizer, staging,
                                     trainer_state, out_dir)

    _write_on_every_process(accelerator, out_dir, write_folder if main else None)
    if main and deferred is None:
        _commit(out_dir)
    accelerator.wait_for_everyone()
    return rest


def _commit(out_dir):
    _drop_hub_results(out_dir)
    committed = os.path.join(out_dir, COMMITTED_DIR)
    os.rename(os.path.join(out_dir, STAGING_DIR), committed)  # the commit point
    _fsync_dir(out_dir)
    _move_into_place(committed, out_dir)


def _finish_later(deferred, model, state_dict, tokenizer, staging, trainer_state, out_dir):
    """A save's writes from host memory, on a background thread, then its commit: what
    save_checkpoint(later=True) returned. A refused write is the same one line as in the loop."""
    try:
        for write, obj, args, kwargs in deferred:
            write(obj, *args, **kwargs)
        _write_model_folder(model, state_dict, tokenizer, staging, trainer_state)
    except WRITE_FAILURES as e:
        failure = describe_write_failure(e, out_dir) or (first_line(e) if isinstance(e, OSError) else None)
        if failure is None:
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"could not write a checkpoint to {out_dir}: {failure}; {last_checkpoint_note(out_dir)}") \
            from None
    _commit(out_dir)


@contextlib.contextmanager
def _writes_deferred(deferred):
    """Accelerate's save_state with its writes (accelerate's `save`, torch.save) kept in `deferred`
    as (function, host copy, args, kwargs) instead of done; a plain save_state where it is None."""
    if deferred is None:
        yield
        return
    import accelerate.checkpointing as accelerate_checkpointing

    def keep(write):
        def kept(obj, *args, **kwargs):
            deferred.append((write, to_host(obj), args, kwargs))
        return kept

    saved = accelerate_checkpointing.save, torch.save
    accelerate_checkpointing.save, torch.save = keep(accelerate_checkpointing.save), keep(torch.save)
    try:
        yield
    finally:
        accelerate_checkpointing.save, torch.save = saved


def to_host(obj, copies=None):
    """`obj` with every tensor copied to CPU memory (containers rebuilt, nothing shared with the
    live training state); tensors that were views of one storage stay one tensor (tied weights)."""
    copies = {} if copies is None else copies
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.device)
        if key not in copies:
            copies[key] = obj.detach().to("cpu", copy=True)
        return copies[key]
    if isinstance(obj, dict):
        return type(obj)((k, to_host(v, copies)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_host(v, copies) for v in obj)
    return obj


def _model_to_write(model, state_dict, staging):
    """(the plain model, its weights) for the model folder. LoRA: the adapter alone is written now (it
    is small), beside a plain folder of the merged weights."""
    if not is_adapted(model):
        return model, state_dict
    hf_logging.disable_progress_bar()
    try:  # save_embedding_layers=False: peft's "auto" asks the Hub about the base at every save
        model.save_pretrained(os.path.join(staging, ADAPTER_DIR), save_embedding_layers=False)
    finally:
        hf_logging.enable_progress_bar()
    return model.get_base_model(), merged_state_dict(model)


def _drop_hub_results(out_dir):
    """The Hub benchmarks' scores (gpt_train.evaluate) describe the weights they were measured on: gone
    before new weights are committed, so no push publishes them with others (a crash in between
    loses scores, never misattributes them). The card's model-index goes with the card it is in."""
    path = os.path.join(out_dir, HUB_EVAL_RESULTS)
    if os.path.islink(path):
        os.remove(path)
    shutil.rmtree(path, ignore_errors=True)


def _write_model_folder(model, state_dict, tokenizer, staging, trainer_state):
    """The Hugging Face folder, its model card and the manifest of the whole staged checkpoint."""
    hf_logging.disable_progress_bar()  # a per-save progress bar would drown the training log
    try:
        model.save_pretrained(staging, state_dict=state_dict)
    finally:
        hf_logging.enable_progress_bar()
    save_tokenizer(tokenizer, staging, context=model.config.n_positions)
    write_model_card(staging, trainer_state)
    give_default_mode(staging)  # safetensors writes model.safetensors 0600
    trainer_state.files = manifest(staging)
    write_json(os.path.join(staging, STATE_DIR, TRAINER_STATE), trainer_state.to_dict())
    _flush_tree(staging)


def _write_on_every_process(accelerator, out_dir, write):
    """Run each process's `write` (None: it writes nothing this time but still takes part); if it
    fails on any process, the save fails on all of them.

    A process that failed alone and exited would leave the others waiting for it at the next
    collective (or crashing there with a transport error); here they all learn of the failure,
    the staged files are dropped and every process stops with the same one-line error.
    """
    failure = None
    try:
        if write is not None:
            write()
    except CheckpointException as e:  # torch.distributed.checkpoint (FSDP) fails on every rank at once
        error = _first_write_failure(e)
        failure = describe_write_failure(error, out_dir) or first_line(error)
    except WRITE_FAILURES as e:
        # any OSError here is a write that failed; a RuntimeError only if it says so
        failure = describe_write_failure(e, out_dir) or (first_line(e) if isinstance(e, OSError) else None)
        if failure is None:
            raise
    failures = [f for f in gather_object([failure]) if f]  # also waits for every process to finish writing
    if failures:
        if accelerator.is_main_process:
            shutil.rmtree(os.path.join(out_dir, STAGING_DIR), ignore_errors=True)
        raise UserError(f"could not write a checkpoint to {out_dir}: {failures[0]}; {last_checkpoint_note(out_dir)}")


def _first_write_failure(checkpoint_exception):
    """The refused write behind a distributed checkpoint failure; anything else is a bug: re-raise."""
    for failure in checkpoint_exception.failures.values():
        error = failure[0]  # (exception, traceback)
        if isinstance(error, WRITE_FAILURES):
            return error
    raise checkpoint_exception


def _full_state_dict(accelerator, model):
    """The whole model's weights under their transformers names (on the main process at least).

    Accelerate gathers the shards under FSDP, but a compiled model's names keep torch.compile's
    `_orig_mod.` prefix, which from_pretrained would not recognise: it would load random weights.
    """
    state_dict = accelerator.get_state_dict(model)
    if state_dict is None:  # FSDP1 gathers onto rank 0 only
        return None
    return {name.removeprefix(COMPILED_PREFIX): tensor for name, tensor in state_dict.items()}


def recover(out_dir):
    """Finish a committed save that was interrupted and drop leftovers of unfinished ones."""
    committed = os.path.join(out_dir, COMMITTED_DIR)
    if os.path.isdir(committed):
        _move_into_place(committed, out_dir)
    shutil.rmtree(os.path.join(out_dir, STAGING_DIR), ignore_errors=True)
    for old in SAVED_FOLDERS_OLD:
        shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)


def _move_into_place(committed, out_dir):
    """Replace the previous checkpoint with the committed one; safe to run again after a crash.
    Files first, then folders (a LoRA run's adapter/), training_state/ last."""
    names = sorted(os.listdir(committed), key=lambda n: (os.path.isdir(os.path.join(committed, n)), n == STATE_DIR))
    for name in names:
        new, path = os.path.join(committed, name), os.path.join(out_dir, name)
        if not os.path.isdir(new):
            os.replace(new, path)
            continue
        old = path + OLD_SUFFIX
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(path):
            os.rename(path, old)  # a folder cannot be renamed over a non-empty one
        os.rename(new, path)
        shutil.rmtree(old, ignore_errors=True)
    os.rmdir(committed)
    _fsync_dir(out_dir)


def read_trainer_state(out_dir, repair=True):
    """The TrainerState of out_dir's checkpoint, after checking the checkpoint is whole.

    `repair`: first finish or drop a save that was cut short, which only the run holding
    out_dir's lock may do (an evaluation only reads)."""
    processes = PartialState()
    if repair and processes.is_main_process and os.path.isdir(out_dir):
        recover(out_dir)  # the process that writes checkpoints is the one that repairs them
    processes.wait_for_everyone()
    state = TrainerState.read(out_dir)
    check_model_folder(out_dir, ": its checkpoint is incomplete and cannot be resumed")
    for name, expected in state.files.items():
        problem = file_problem(os.path.join(out_dir, name), expected)
        if problem:
            raise UserError(f"the checkpoint in {out_dir} is damaged: {name} {problem}. "
                            "It cannot be resumed; start again or restore a copy of out_dir")
    return state


def load_training_state(accelerator, out_dir):
    """Optimizer, scheduler, scaler and RNG states (and the model's shards under FSDP), or a clear error."""
    _check_sharding_matches(accelerator, out_dir)
    try:
        accelerator.load_state(os.path.join(out_dir, STATE_DIR))
    except DAMAGED_STATE as e:  # what torch, pickle and safetensors raise for a damaged or foreign file
        raise UserError(f"the training state in {os.path.join(out_dir, STATE_DIR)} cannot be loaded "
                        f"({first_line(e)}): the checkpoint is corrupt or from another model") from None


def _check_sharding_matches(accelerator, out_dir):
    """FSDP and DDP write the model and optimizer state in different files: say which to run.

    Under FSDP the process count may change (torch.distributed.checkpoint reshards on load).
    """
    state_dir = os.path.join(out_dir, STATE_DIR)
    saved_by_fsdp = any(name.startswith(FSDP_MODEL_STATE) for name in os.listdir(state_dir))
    running_fsdp = accelerator.distributed_type == DistributedType.FSDP
    if saved_by_fsdp and not running_fsdp:
        raise UserError(f"{state_dir} was saved by FSDP: resume it under FSDP, with any number of processes "
                        "(accelerate launch --config_file accelerate_configs/fsdp_8xa100.yaml --num_processes N "
                        f"train.py ...), or start a new run from its weights with --init_from={out_dir} "
                        "--out_dir=NEW_DIR")
    if running_fsdp and not saved_by_fsdp:
        raise UserError(f"{state_dir} was saved without FSDP: resume it without FSDP (plain python train.py or "
                        f"a DDP config), or start a new FSDP run from its weights with --init_from={out_dir} "
                        "--out_dir=NEW_DIR")


def start_run_folder(out_dir, replace, resumed_at=None):
    """On the main process: out_dir created (another run's files removed first if `replace`) and what
    a killed write left there cleared, before any tracker writes to it (TensorBoard's runs/); for a
    resume (`resumed_at`: its iteration), what the interrupted session logged past its checkpoint."""
    if not PartialState().is_main_process:
        return
    if replace:
        previous = TrainerState.read_if_any(out_dir) if os.path.isdir(out_dir) else None
        removed = remove_previous_run(out_dir)
        if removed:
            which = f" (its checkpoint at iteration {previous.iter_num:,})" if previous else ""
            print(f"overwrite_output_dir: removed the previous run in {out_dir}{which}: {', '.join(removed)}")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # a write killed half-way (loss.png, say) left its temporary
        if ATOMIC_TEMPORARY.fullmatch(name) and written_by_gpt_train(name):
            os.remove(os.path.join(out_dir, name))
    torn = drop_torn_last_line(out_dir)
    if torn:
        print(f"warning: {METRICS}'s last line was cut short ({torn} bytes, a write that never finished): "
              "dropped it")
    if resumed_at is not None:
        drop_records_from(out_dir, resumed_at)


def write_run_settings(out_dir, settings):
    """On the main process: the run's settings, out_dir/training_config.json."""
    if PartialState().is_main_process:
        write_json(os.path.join(out_dir, RUN_CONFIG), settings)


def remove_previous_run(out_dir):
    """Delete what a previous run wrote to out_dir and return the names removed.

    Only top-level names gpt-train itself writes go (out_dir.written_by_gpt_train), whatever a
    file in the folder lists; a symlink among them is unlinked, never followed: nothing outside
    out_dir is ever deleted.
    """
    if not os.path.isdir(out_dir):
        return []
    recover(out_dir)
    removed = sorted(name for name in os.listdir(out_dir) if written_by_gpt_train(name))
    for name in removed:
        path = os.path.join(out_dir, name)
        try:
            remove_path(path)
        except OSError as e:  # a mount point (EBUSY), a file another system holds: the user's to clear
            raise UserError(f"overwrite_output_dir: could not remove {path} ({e.strerror or e}): remove or "
                            "unmount it yourself, or choose another out_dir") from None
    return removed


def refresh_manifest(out_dir, names):
    """After files of out_dir's model folder were rewritten on purpose (convert upgrade): the
    checkpoint's manifest describes them as they are now, so resume still trusts it."""
    state = TrainerState.read_if_any(out_dir)
    if state is None:
        return  # a model folder without a checkpoint: nothing to keep in step
    state.files.update(manifest(out_dir, names))
    write_json(os.path.join(out_dir, STATE_DIR, TRAINER_STATE), state.to_dict())


def _flush_tree(folder):
    """fsync every file and folder, so the commit rename never points at data still in flight."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
