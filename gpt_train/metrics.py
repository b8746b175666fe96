"""Where the loop's numbers go: Accelerate's trackers, one of which is out_dir/metrics.jsonl.

`MetricsFile` is an Accelerate tracker beside those report_to names (wandb, TensorBoard, Trackio),
so the loop calls `log` (Accelerate's `accelerator.log`) once and every tracker gets the same names
at the same steps; Accelerate decides that only the main process writes. An evaluation-only run
has no MetricsFile and no TensorBoard: it writes nothing to out_dir. The console goes through
`accelerator.print`.

Not here: computing the numbers (the loop), reading metrics.jsonl (gpt_train.out_dir).
"""
import json
import os
import tempfile
import time
import traceback

from accelerate.tracking import GeneralTracker
from accelerate.utils import is_tensorboard_available, is_trackio_available, is_wandb_available

from gpt_train.errors import UserError, first_line
from gpt_train.files import atomic_path
from gpt_train.out_dir import METRICS

TAIL_CHUNK = 1 << 16
WANDB_LOCAL_MODES = ("offline", "disabled", "dryrun")
WANDB_WAY_OUT = "or log locally with WANDB_MODE=offline and upload later with `wandb sync`"
# Accelerate leaves out a tracker whose package is missing, saying so at debug level only
INSTALLED = {"wandb": is_wandb_available, "tensorboard": is_tensorboard_available, "trackio": is_trackio_available}


class MetricsFile(GeneralTracker):
    """out_dir/metrics.jsonl: one JSON object per event, {"event", "iter", "time", **values}."""

    name = METRICS
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, out_dir):
        super().__init__()
        self.path = os.path.join(out_dir, METRICS)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values):
        pass  # the settings are out_dir/training_config.json

    def log(self, values, step=None, event="train", **kwargs):
        record = {"event": event, "iter": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def drop_torn_last_line(out_dir):
    """Cut a last line that a write left unfinished (a full disk, a kill mid-line) off out_dir's
    metrics.jsonl, so the resumed run's records start on a line of their own; the bytes dropped."""
    path = os.path.join(out_dir, METRICS)
    if not os.path.isfile(path):
        return 0
    with open(path, "r+b") as f:
        end = keep = f.seek(0, os.SEEK_END)
        while keep:  # back to just after the last newline, a chunk at a time
            start = max(0, keep - TAIL_CHUNK)
            f.seek(start)
            newline = f.read(keep - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        if keep < end:
            f.truncate(keep)
    return end - keep


def drop_records_from(out_dir, iteration):
    """Before a resume from `iteration`: drop what the interrupted session logged from there on (its
    steps past the checkpoint, the evaluation the resumed run repeats), as TensorBoard's purge_step
    does, so that each iteration keeps one record of each event. Scores lm-eval gave the checkpoint
    itself stay: the resumed run does not judge the same weights again. Lines that are no record
    (edited by hand) stay as they are. The number of records dropped."""
    path = os.path.join(out_dir, METRICS)
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.readlines()
    kept = [line for line in lines if not _repeated(line, iteration)]
    if len(kept) < len(lines):
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.writelines(kept)
    return len(lines) - len(kept)


def _repeated(line, iteration):
    try:
        record = json.loads(line)
        step = int(record["iter"])
    except (ValueError, TypeError, KeyError):
        return False
    return step > iteration or (step == iteration and record.get("event") != "lm_eval")


def trackers(cfg, writes):
    """What a run logs to: metrics.jsonl and TensorBoard's runs/ if it writes out_dir (an evaluation
    does not), and wandb and Trackio as report_to says."""
    names = [name for name in cfg.trackers if writes or name != "tensorboard"]
    return ([MetricsFile(cfg.out_dir)] if writes else []) + names


def check_trackers(cfg):
    """Each tracker asked for is installed, and wandb has its key: refused before anything is loaded."""
    for name in cfg.trackers:
        if not INSTALLED[name]():
            raise UserError(f"report_to={name} needs the {name} package, which is not installed: "
                            "pip install -r requirements.txt")
    if "wandb" in cfg.trackers:
        check_wandb_login()
    if "trackio" in cfg.trackers:  # Trackio writes from a thread of its own, which fails without a word
        _check_writable(trackio_dir(), "report_to=trackio", "set TRACKIO_DIR to a folder you can write to")


def trackio_dir():
    """Where Trackio keeps its runs, as trackio decides it (without importing it: ~1 s)."""
    from huggingface_hub import constants

    return os.environ.get("TRACKIO_DIR") or os.path.join(constants.HF_HOME, "trackio")


def _check_writable(folder, who, advice):
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{who} cannot write to {folder} ({e.strerror or first_line(e)}): {advice}") from None


def log(accelerator, event, iteration, values):
    """One 'train' or 'eval' event to every tracker, from the main process (Accelerate's rule)."""
    accelerator.log(values, step=iteration, log_kwargs={METRICS: {"event": event}})


def check_wandb_login():
    """wandb_log=True without a key would stop with wandb's traceback once the run has started."""
    if os.environ.get("WANDB_MODE", "").lower() in WANDB_LOCAL_MODES:
        return
    import wandb  # deferred: only runs that log to wandb pay for its import (~1 s)
    if not wandb.login(prompt=False, verify=False):
        raise UserError(f"wandb_log=True needs a W&B API key: run `wandb login` or set WANDB_API_KEY, {WANDB_WAY_OUT}")


def start_trackers(accelerator, cfg, config, tracker_run_id, resumed_at=None):
    """Start the run's trackers; the wandb run's id, on the main process, for the checkpoint. A
    resume (`resumed_at`: its iteration) continues the run where the tracker can: wandb the saved
    run id, TensorBoard the same folder (hiding what the interrupted session logged from that
    iteration on, which the resumed run logs again), Trackio the latest run of that name in the
    project. A tracker's own failure (no network, a bad key, a folder it cannot write) is one line."""
    wandb = {"name": cfg.wandb_run_name}
    if tracker_run_id:
        wandb.update(id=tracker_run_id, resume="allow")
    init = {"wandb": wandb,
            "tensorboard": {} if resumed_at is None else {"purge_step": resumed_at},
            "trackio": {"name": cfg.wandb_run_name, "resume": "never" if resumed_at is None else "allow"}}
    if accelerator.is_main_process and "tensorboard" in {str(t) for t in accelerator.log_with}:
        # a folder it cannot write fails TensorBoard's writer thread too, which prints its own traceback
        _check_writable(os.path.join(accelerator.logging_dir, cfg.wandb_project), "report_to=tensorboard",
                        "make it writable, or leave tensorboard out of report_to")
    try:
        accelerator.init_trackers(cfg.wandb_project, config=config, init_kwargs=init)
    except Exception as e:  # wandb raises its own types and plain ones (timeouts) alike
        name = _failed_tracker(e)
        advice = f": check the network and key, {WANDB_WAY_OUT}" if name == "wandb" else ""
        raise UserError(f"{name} could not start the run ({first_line(e)}){advice}") from None
    if "wandb" not in cfg.trackers:
        return None
    return getattr(accelerator.get_tracker("wandb", unwrap=True), "id", None)  # None off the main process


def _failed_tracker(error):
    """The name of the Accelerate tracker whose start raised `error`: the innermost method of one."""
    names = [frame.f_locals["self"].name for frame, _ in traceback.walk_tb(error.__traceback__)
             if isinstance(frame.f_locals.get("self"), GeneralTracker)]
    return names[-1] if names else "a tracker"
