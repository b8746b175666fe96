"""The training run: `setup` builds everything from a TrainConfig, `fit` is nanoGPT's loop.

Accelerate owns devices, precision, compilation and distribution: the loop below is the
same for a laptop CPU, one GPU, DDP on 8 GPUs or FSDP. gradient_accumulation_steps keeps
nanoGPT's meaning, micro-steps per optimizer step summed over all processes, so the
tokens per iteration do not depend on how many processes run.

    python train.py configs/train_shakespeare_char.py --max_iters=1000
    accelerate launch --config_file accelerate_configs/8xa100.yaml train.py configs/train_gpt2.py
"""
import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin, ProjectConfiguration, TorchDynamoPlugin, set_seed
from torch.distributed.fsdp import MixedPrecisionPolicy

from gpt_train import checkpoint, run_lock
from gpt_train.auto_batch import find_batch_size
from gpt_train.bins import BinData
from gpt_train.chat import copy_template
from gpt_train.config import tokens_per_iter
from gpt_train.data import IGNORE_INDEX, SPLITS, TrainingData, bits_per_byte, bytes_per_token, check_token_ids
from gpt_train.device import free_memory, fsdp_compute_dtype, peer_failure
from gpt_train.errors import UserError
from gpt_train.evaluate import Judge
from gpt_train.files import WRITE_FAILURES, describe_write_failure
from gpt_train.hub import HubPusher
from gpt_train.loss import use_chunked_loss
from gpt_train.lora import add_adapters, check_base_unchanged, is_adapted, trainable_summary
from gpt_train.memory import GB, Workload, check_fits, estimate
from gpt_train.metrics import check_trackers, log, start_trackers, trackers
from gpt_train.model import (build_model, count_parameters, crop_block_size, flops_per_token, load_pretrained,
                             read_model_config, ready_for_training, scratch_vocab_size, use_causal_sdpa)
from gpt_train.optim import lr_multiplier, make_optimizers, schedule_warning, set_hyperparameters, set_schedule
from gpt_train.out_dir import RUN_CONFIG, STATE_DIR, TENSORBOARD_DIR, TrainerState, last_checkpoint_note
from gpt_train.plot import LivePlot
from gpt_train.saver import Saver
from gpt_train.progress import Progress, bar, peak_flops
from gpt_train.signals import StopSignals
from gpt_train.start import plan
from gpt_train.stream import StreamData
from gpt_train.tokenizer import first_disagreement, model_tokenizer, token_byte_lengths

MAX_LOG_PERPLEXITY = 700.0  # exp() of more overflows a float; a diverged run's loss can get there


class NonFiniteLoss(UserError):
    """The loss went NaN or infinite; the run stops before it can reach a checkpoint."""


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: object
    accelerator: Accelerator
    model: torch.nn.Module
    optimizers: list  # AdamW, and Muon with optimizer='muon'
    schedulers: list  # one LambdaLR per optimizer, the same multiplier
    data: TrainingData  # training batches, the evaluation sampler, the data's tokenizer (gpt_train.data)
    tokenizer: object  # saved with every checkpoint: the model's, or the data's for a scratch model
    micro_steps: int  # micro-steps per optimizer step on this process
    tokens_per_iter: int
    bytes_per_token: float  # of the val text: turns val loss into bits per byte
    iter_num: int = 0
    best_val_loss: float = math.inf
    best_iter: int | None = None  # where best_val_loss was measured
    tracker_run_id: str | None = None
    skipped_steps: int = 0  # steps skipped for a non-finite loss (skip_nonfinite_steps)
    stop: StopSignals | None = None  # SIGTERM/SIGINT received during fit
    judge: Judge | None = None  # benchmarks on each saved checkpoint, or on the evaluated model
    lock: run_lock.OutDirLock | None = None  # out_dir held for this run (main process; an evaluation has none)
    saver: Saver | None = None  # writes checkpoints (at once or in the background), then judges and publishes them
    eval_batches: int = 0  # batches per split in an evaluation: eval_iters, more if auto_find_batch_size shrank them
    evaluated_checkpoint: int | None = None  # the iteration of the evaluated checkpoint a resume starts from

    @property
    def sampler(self):
        return self.data.sampler  # evaluation batches (and, for bins, the training ones)


def setup(cfg):
    """A training run from its settings, built and opened: ready for `fit`."""
    return open_training(plan(cfg))


def open_training(start):
    """The run `build` makes, its micro-batch found (auto_find_batch_size), its out_dir opened."""
    with start.released_on_error():
        run = build(start)
        if start.cfg.auto_find_batch_size:  # after the restore: a resumed optimizer state is in memory
            vocab_size = run.accelerator.unwrap_model(run.model, keep_torch_compile=False).config.vocab_size
            state = 0 if start.saved else estimate(_workload(start, vocab_size)).optimizer
            saved = start.saved and (start.saved.micro_batch or start.saved.config.get("batch_size"))
            find_batch_size(run, forward_loss, state, saved=saved)
        _open_run_folder(run, start)
        return run


def build(start):
    """What training and an evaluation share, from the start (gpt_train.start): data and model,
    Accelerate's objects, the saved state on top, the judge and the Hub; each decided once, in
    that order. Refusals come before anything is loaded."""
    cfg, processes = start.cfg, start.processes
    check_trackers(cfg)
    if schedule_warning(cfg):  # nanoGPT runs such a schedule, so do we
        processes.print(schedule_warning(cfg))
    if processes.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for what autocast leaves in float32
    micro_steps = micro_steps_per_process(cfg.gradient_accumulation_steps, processes.num_processes)
    set_seed(cfg.seed)  # identical initial weights on every process
    data = (StreamData if cfg.stream_from else BinData)(cfg, start.folder, processes)  # before any weights
    model, tokenizer = _init_model(start, data)
    val_bytes = bytes_per_token(data.sampler.bins, "val", token_byte_lengths(tokenizer, model.config.vocab_size))
    accelerator = Accelerator(
        mixed_precision=start.mixed,
        gradient_accumulation_steps=micro_steps,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step ourselves
        log_with=trackers(cfg, start.writes) or None,
        project_config=ProjectConfiguration(logging_dir=os.path.join(cfg.out_dir, TENSORBOARD_DIR)),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if cfg.compile else None,
        fsdp_plugin=_fsdp_plugin(start.mixed) if start.fsdp else None,
    )
    set_seed(cfg.seed, device_specific=True)  # but each process its own dropout masks
    optimizers = make_optimizers(_ready_to_train(model, cfg), cfg, processes.device.type)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_multiplier(cfg)) for o in optimizers]
    model, *prepared = accelerator.prepare(model, *optimizers, *schedulers)
    optimizers, schedulers = prepared[:len(optimizers)], prepared[len(optimizers):]
    checkpoint.store_weights_once(accelerator)  # resume has loaded them from the model folder already
    run = Run(cfg, accelerator, model, optimizers, schedulers, data, tokenizer, micro_steps=micro_steps,
              tokens_per_iter=tokens_per_iter(cfg), bytes_per_token=val_bytes, eval_batches=cfg.eval_iters)
    if start.saved:
        _restore(run, start)
    run.lock, run.judge = start.lock, Judge(cfg, start.judged, processes.print)
    hub = HubPusher(cfg, accelerator.print)  # without a token it stops here, before training
    run.saver = Saver(cfg.async_save, run.judge, publishers=(start.home, hub))  # a store's copy, then the Hub
    return run


def _ready_to_train(model, cfg):
    model.train()  # from_pretrained returns eval mode: dropout would be off until the first evaluation
    use_causal_sdpa(model)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if cfg.chunked_loss:
        use_chunked_loss(model.get_base_model() if is_adapted(model) else model)
    return model


def _restore(run, start):
    """The saved state on top of what setup built: optimizer, scheduler and RNGs, then the loop's own."""
    cfg, saved = run.cfg, start.saved
    checkpoint.load_training_state(run.accelerator, cfg.out_dir)
    run.data.load_state(os.path.join(cfg.out_dir, STATE_DIR))
    for optimizer, scheduler in zip(run.optimizers, run.schedulers, strict=True):
        set_hyperparameters(optimizer, cfg)  # the settings' values, not those the state was saved with
        set_schedule(optimizer, scheduler.scheduler, cfg)
    run.iter_num, run.best_val_loss, run.best_iter = saved.iter_num, saved.best_val_loss, saved.best_iter
    run.tracker_run_id, run.skipped_steps = saved.tracker_run_id, saved.skipped_steps
    run.evaluated_checkpoint = saved.iter_num if saved.val_loss is not None else None
    for line in start.changes:
        start.processes.print(line)
    start.processes.print(f"resuming from iteration {run.iter_num:,} (best val {run.best_val_loss:.4f})")


def micro_steps_per_process(gradient_accumulation_steps, num_processes):
    """nanoGPT's split: the accumulation steps are shared out, so tokens per iteration stay put."""
    if gradient_accumulation_steps % num_processes:
        raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by "
                        f"the {num_processes} processes: use a multiple of {num_processes}")
    return gradient_accumulation_steps // num_processes


def _fsdp_plugin(mixed):
    """The launch config's FSDP settings, with FSDP2 computing in bf16 but keeping float32 where DDP does.

    Accelerate's FSDP2 policy also casts the gradient reduce-scatter and the model's output to
    bf16: gradients would be summed in bf16 and the loss rounded to 3 digits (4.1875, 4.1719).
    """
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* settings accelerate launch exported
    compute_dtype = fsdp_compute_dtype(mixed)
    if plugin.fsdp_version == 2 and compute_dtype is not None:
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    return plugin


def _init_model(start, data):
    """(model, tokenizer): whether the run fits in memory, then the model: a scratch model takes its
    vocabulary from the data, a loaded one keeps its own and must read the data as the data were
    written."""
    cfg, config, where = start.cfg, start.model_config, start.where
    bins = data.sampler.bins
    if not start.folder:
        vocab_size = scratch_vocab_size(bins.vocab_size, data.tokenizer)
        _check_memory(start, vocab_size)
        model = build_model(cfg, vocab_size, data.tokenizer)
        check_token_ids(bins, model.config.vocab_size)
        return model, data.tokenizer
    _check_memory(start, config.vocab_size)
    tokenizer = copy_template(data.tokenizer, model_tokenizer(start.folder))  # a chat dataset's template
    data_vocab = bins.vocab_size or len(data.tokenizer)
    if data_vocab > config.vocab_size:
        raise UserError(f"{data.name} uses token ids up to {data_vocab - 1} but {where} has a vocabulary of "
                        f"{config.vocab_size}: {data.retokenize(where)}")
    disagreement = first_disagreement(data.tokenizer, tokenizer, data_vocab)
    if disagreement:
        i, theirs, ours = disagreement
        raise UserError(f"{data.name} was encoded with another tokenizer than {where}'s (id {i} is {theirs!r} in the "
                        f"data, {ours!r} in the model): {data.retokenize(where)}")
    check_token_ids(bins, config.vocab_size)
    if start.base_folder:  # LoRA: its frozen base, cropped as the run's model, and the adapters on top
        base = load_pretrained(start.base_folder, read_model_config(start.base_folder, start.base))
        model = ready_for_training(crop_block_size(base, cfg.block_size), cfg.dropout)
        model = add_adapters(model, cfg, start.base, start.adapter)
        if start.adapter:
            check_base_unchanged(model, start.folder, start.base)
        return model, tokenizer
    model = crop_block_size(load_pretrained(start.folder, config), cfg.block_size)
    return ready_for_training(model, cfg.dropout), tokenizer


def _check_memory(start, vocab_size):
    """The run's estimated peak memory against the device's free memory (gpt_train.memory): refused
    in one line where it does not fit, said at the start on a GPU."""
    cfg, processes = start.cfg, start.processes
    free = free_memory(processes.device)
    if free is None or not cfg.memory_check:
        return
    need = check_fits(_workload(start, vocab_size), free, processes.device.type, pretrained=bool(start.folder),
                      resumed=bool(start.saved), smaller_batch_ok=cfg.auto_find_batch_size)
    if processes.device.type == "cuda":
        processes.print(f"memory: {need} of {free / GB:,.1f} GB free")


def _workload(start, vocab_size):
    processes = start.processes
    return Workload(start.cfg, vocab_size, processes.device.type, fsdp_compute_dtype(start.mixed),
                    processes.num_processes, shards=processes.num_processes if start.fsdp else 1,
                    training=start.writes)


def _open_run_folder(run, start):
    """out_dir opened for this run (another run's files replaced where allowed), the trackers
    started, then the settings written, and the start reported."""
    cfg = run.cfg
    checkpoint.start_run_folder(cfg.out_dir, replace=start.replace,  # before TensorBoard puts runs/ there
                                resumed_at=run.iter_num if start.saved else None)
    start.home.opened(cfg.out_dir, start.replace)  # a store's previous run goes with the local one
    _start_trackers(run, start)
    checkpoint.write_run_settings(cfg.out_dir, dataclasses.asdict(cfg))  # after: a failed wandb leaves none
    _report_start(run, all_settings=os.path.join(cfg.out_dir, RUN_CONFIG))


def _start_trackers(run, start):
    run.tracker_run_id = start_trackers(run.accelerator, run.cfg, dataclasses.asdict(run.cfg), run.tracker_run_id,
                                        resumed_at=run.iter_num if start.saved else None)


def _report_start(run, all_settings):
    cfg, acc = run.cfg, run.accelerator
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}
    acc.print(f"settings not at their defaults (all of them: {all_settings}): "
              + ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    acc.print(f"tokens per iteration will be: {run.tokens_per_iter:,}")
    if run.sampler.bins.masked:
        share = float(run.sampler.bins.mask("train").mean())
        acc.print(f"chat data: the loss counts the assistant's tokens alone, {100 * share:.1f}% of train.bin "
                  f"(~{share * run.tokens_per_iter:,.0f} per iteration)")
    acc.print(f"{acc.num_processes} process(es) on {acc.device.type}, {run.micro_steps} micro-steps each, "
              f"precision {acc.mixed_precision}")
    model = acc.unwrap_model(run.model, keep_torch_compile=False)  # compiled: the PeftModel inside
    acc.print(f"number of parameters: {count_parameters(model) / 1e6:.2f}M")
    if is_adapted(model):
        acc.print(trainable_summary(model))


@torch.no_grad()
def estimate_loss(run):
    """Mean loss over eval_iters batches per split, the batches shared out over processes."""
    acc, cfg, model = run.accelerator, run.cfg, run.model
    model.eval()
    losses = {}
    for split in SPLITS:
        offsets = run.sampler.iteration_offsets(split, run.iter_num, run.eval_batches, purpose="eval")
        # Every process runs the same number of forwards (FSDP needs it); padding batches weigh 0.
        # (Accelerate's split_between_processes pads with repeats that would count twice.)
        per_process = math.ceil(run.eval_batches / acc.num_processes)
        total = torch.zeros(2, device=acc.device)
        for k in bar(cfg.progress, range(per_process), f"eval {split}"):
            index = acc.process_index + k * acc.num_processes
            x, y = run.sampler.batch(split, offsets[index % run.eval_batches])
            weight = torch.tensor(float(index < run.eval_batches), device=acc.device)
            if run.sampler.bins.masked:  # a chat batch weighs by its targets: the mean is over tokens
                targets = (y != IGNORE_INDEX).sum()
                loss, weight = forward_loss(model, x, y, targets.clamp(min=1)), weight * targets
            else:
                loss = forward_loss(model, x, y)
            total += torch.stack([loss.float() * weight, weight])
        total = acc.reduce(total, reduction="sum")
        losses[split] = (total[0] / total[1]).item()
    model.train()
    return losses


def forward_loss(model, x, y, targets=None):
    """The loss on (x, y): transformers' mean over y's targets, or, given `targets` (a chat dataset,
    whose y skips the user's tokens), their summed loss divided by it, so that batches weigh by the
    tokens they hold and one of user turns alone adds 0, not 0/0."""
    count = {} if targets is None else {"num_items_in_batch": targets}
    return model(input_ids=x, labels=y, shift_labels=y, use_cache=False, **count).loss


def train_batches(run):
    """This process's (x, y, targets) micro-batches from run.iter_num on (gpt_train.data's
    TrainingData.batches); they end, on every process at once, where the data do."""
    return run.data.batches(run.accelerator, run.iter_num, run.micro_steps)


def save(run, val_loss=None):
    """A checkpoint of the weights now: `val_loss` is theirs, None when a stop signal saves them unevaluated."""
    state = TrainerState(iter_num=run.iter_num, best_val_loss=run.best_val_loss, best_iter=run.best_iter,
                         val_loss=val_loss, stopped_by=None if val_loss is not None else run.stop.name,
                         tokens_seen=run.iter_num * run.tokens_per_iter, tracker_run_id=run.tracker_run_id,
                         skipped_steps=run.skipped_steps, val_bytes_per_token=run.bytes_per_token,
                         micro_batch=run.sampler.batch_size if run.cfg.auto_find_batch_size else None,
                         config=dataclasses.asdict(run.cfg))
    run.accelerator.print(f"saving checkpoint to {run.cfg.out_dir}")
    run.saver.save(run.accelerator, run.model, run.tokenizer, run.cfg.out_dir, state, run.data.save_state)


def fit(run):
    cfg, acc, model = run.cfg, run.accelerator, run.model
    rows_per_iter = run.sampler.batch_size * run.micro_steps  # auto_find_batch_size may have changed the split
    flops_per_iter = flops_per_token(acc.unwrap_model(model)) * rows_per_iter * cfg.block_size
    # peak None: a GPU not in the table says "mfu n/a"; a CPU's lines leave MFU out
    progress = Progress(acc, cfg.out_dir, cfg.max_iters, run.iter_num, run.tokens_per_iter, flops_per_iter,
                        peak_flops(acc.device), mfu_shown=acc.device.type != "cpu")  # log line, ETA, summary
    plot = LivePlot(acc, cfg.out_dir)  # out_dir/loss.png, after evals and the last one
    batches = train_batches(run)
    batch = next(batches, None)  # (x, y, targets); None once the data have ended
    t0 = time.time()
    while True:
        lr = run.schedulers[0].get_last_lr()[0]  # AdamW's; Muon's follows the same multiplier

        # evaluate the loss on train/val sets and write checkpoints
        ended = batch is None  # data that ran out (a stream) end the run as max_iters does
        last = run.iter_num >= cfg.max_iters or ended
        if run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters or ended:
            evaluate_and_checkpoint(run, lr, progress.mfu_record(), plot, last)
        if ended:
            acc.print(run.data.ended(run.iter_num, cfg.max_iters))
        if last:
            break

        # forward, backward, update; gradients are synchronised only on the last micro-step
        loss_sum = torch.zeros((), device=acc.device)
        for _ in range(run.micro_steps):
            with acc.accumulate(model):
                loss = forward_loss(model, *batch)
                batch = next(batches, None)  # prefetch while the device is busy
                acc.backward(loss)
            loss_sum += loss.detach()
        if cfg.skip_nonfinite_steps and not torch.isfinite(acc.reduce(loss_sum, reduction="sum")).item():
            run.skipped_steps += 1  # no update: the weights stay as they were (a host sync every step)
            acc.print(f"iter {run.iter_num}: non-finite loss, step skipped ({run.skipped_steps} so far)")
        else:
            if cfg.grad_clip:
                acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for optimizer in run.optimizers:
                optimizer.step()
        for scheduler in run.schedulers:
            scheduler.step()
        for optimizer in run.optimizers:
            optimizer.zero_grad(set_to_none=True)

        # timing and logging
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        log_step = run.iter_num % cfg.log_interval == 0
        if log_step:
            # mean over every micro-step of every process; the only host sync of the step
            lossf = acc.reduce(loss_sum, reduction="mean").item() / run.micro_steps
            if not cfg.skip_nonfinite_steps:
                check_finite(run, lossf, "loss")
            line, record = progress.step_line(run.iter_num, lossf, dt)
            acc.print(line)
            log(acc, "train", run.iter_num, {"train/step_loss": lossf, "lr": lr, **record})
        run.iter_num += 1
        run.saver.check()  # a save that failed in the background stops the run here

        # pre-emption (SIGTERM) or Ctrl-C: checkpoint at this step boundary, then stop
        if run.stop and run.stop.agreed(at_sync_point=log_step):
            if not cfg.skip_nonfinite_steps:
                check_finite(run, acc.reduce(loss_sum, reduction="mean").item() / run.micro_steps, "loss")
            save(run)
            acc.print(f"{run.stop.name} received: stopped after iteration {run.iter_num - 1}; "
                      "continue with --init_from=resume")
            break
    run.saver.wait()  # the save in flight ends before the run reports its end
    progress.summary(run.iter_num, stopped_by=run.stop.name if run.stop else None)
    acc.end_training()
    run.saver.finish(cfg.out_dir, run.iter_num)  # a store's last logs, the Hub's uploads (a failed last one: an error)
    return run


def report_losses(run, lr, mfu_record=None):
    """Both losses, printed and logged like nanoGPT's eval step; {split: loss}."""
    acc = run.accelerator
    losses = estimate_loss(run)
    perplexity = {split: math.exp(min(loss, MAX_LOG_PERPLEXITY)) for split, loss in losses.items()}
    bpb = bits_per_byte(losses["val"], run.bytes_per_token)
    acc.print(f"step {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
              f"({bpb:.4f} bits per byte)")
    log(acc, "eval", run.iter_num, {"train/loss": losses["train"], "val/loss": losses["val"],
                                    "train/perplexity": perplexity["train"], "val/perplexity": perplexity["val"],
                                    "val/bpb": bpb, "lr": lr, **(mfu_record or {})})
    return losses, perplexity


def evaluate_and_checkpoint(run, lr, mfu_record, plot, last):
    """nanoGPT's eval step: report both losses, keep the checkpoint if val improved (or always)."""
    losses, _ = report_losses(run, lr, mfu_record)
    check_finite(run, losses["val"], "val loss")  # before it can replace the last good checkpoint
    plot.update(last)  # before the save: a checkpoint pushed or stored carries the chart of its eval
    if losses["val"] < run.best_val_loss or run.cfg.always_save_checkpoint:
        if losses["val"] < run.best_val_loss:
            run.best_val_loss, run.best_iter = losses["val"], run.iter_num
        if run.iter_num > 0 and run.iter_num != run.evaluated_checkpoint:  # a resume's own weights are saved
            save(run, val_loss=losses["val"])


def evaluate_only(start):
    """eval_only: the model the start names, built as for training, evaluated once: its losses,
    perplexity and benchmarks reported and logged, nothing written to out_dir (nanoGPT's
    `if iter_num == 0 and eval_only: break`)."""
    run = build(start)
    _start_trackers(run, start)
    _report_start(run, all_settings="--print_config")
    losses, perplexity = report_losses(run, run.schedulers[0].get_last_lr()[0])
    run.accelerator.print(f"perplexity: train {perplexity['train']:.2f}, val {perplexity['val']:.2f}")
    run.judge(run.accelerator, run.iter_num, keep=False)  # an evaluation keeps no scores
    run.accelerator.end_training()
    run.data.close()
    return run


def check_finite(run, loss, what):
    """Stop the run on a NaN or infinite loss, before anything is saved from it."""
    if not math.isfinite(loss):
        out_dir, saved = run.cfg.out_dir, TrainerState.read_if_any(run.cfg.out_dir)
        way_on = (f"nothing was saved after the last good checkpoint in {out_dir} (iteration {saved.iter_num:,}). "
                  "Lower learning_rate and continue from it with --init_from=resume" if saved else
                  f"no checkpoint was written to {out_dir}. Lower learning_rate and start the run again with "
                  "--overwrite_output_dir=True")
        raise NonFiniteLoss(f"{what} is {loss} at iteration {run.iter_num}: stopping; {way_on}, or set "
                            "skip_nonfinite_steps=True")


def train(cfg):
    start = plan(cfg)
    with start.home.naming():  # a store's run is named by its URL, not by its working copy
        return _train(start)


def _train(start):
    if not start.writes:  # eval_only
        return evaluate_only(start)
    run = open_training(start)
    with StopSignals(run.accelerator) as run.stop:
        try:
            return fit(run)
        except NonFiniteLoss:
            run.accelerator.end_training()  # close trackers and the process group before exiting
            raise
        except WRITE_FAILURES as e:  # the disk filled, a size limit, out_dir turned read-only: what is left
            run.saver.close()  # a background save ends (or fails) first: the note names what is left
            why = describe_write_failure(e, run.cfg.out_dir)
            if why:
                raise UserError(f"could not write to {run.cfg.out_dir}: {why}; "
                                f"{last_checkpoint_note(run.cfg.out_dir)}") from None
            # a collective whose peer is gone: say what is left, not gloo's traceback
            why = peer_failure(e, run.cfg.ddp_timeout) if run.accelerator.num_processes > 1 else None
            if why is None:
                raise
            raise UserError(f"{why}: {last_checkpoint_note(run.cfg.out_dir)}") from None
        finally:
            run.saver.close()  # a save in flight is finished, also when the run failed
            run.data.close()  # a stream's producer thread, also when the run failed
            if run.lock:
                run.lock.release()  # the process's end would too; in-process callers need it now
