"""Where the loop's numbers go: Accelerate's trackers, one of which is out_dir/metrics.jsonl.

`MetricsFile` is an Accelerate tracker beside wandb, so the loop calls `log` (Accelerate's
`accelerator.log`) and Accelerate decides that only the main process writes. An evaluation-only
run has no MetricsFile: it writes nothing. The console goes through `accelerator.print`.

Not here: computing the numbers (the loop), reading metrics.jsonl (gpt_train.out_dir).
"""
import json
import os
import time

from accelerate.tracking import GeneralTracker

from gpt_train.errors import UserError, first_line
from gpt_train.out_dir import METRICS

TAIL_CHUNK = 1 << 16
WANDB_LOCAL_MODES = ("offline", "disabled", "dryrun")
WANDB_WAY_OUT = "or log locally with WANDB_MODE=offline and upload later with `wandb sync`"


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


def trackers(cfg, writes):
    """What a run logs to: metrics.jsonl if it writes out_dir (an evaluation does not), and wandb if asked."""
    return ([MetricsFile(cfg.out_dir)] if writes else []) + (["wandb"] if cfg.wandb_log else [])


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


def start_trackers(accelerator, cfg, config, tracker_run_id):
    """Start the run's trackers (continuing the saved wandb run on a resume); the wandb run's id,
    on the main process, for the checkpoint. wandb's own failures (no network, a bad key) are one line."""
    init = {"name": cfg.wandb_run_name}
    if tracker_run_id:
        init.update(id=tracker_run_id, resume="allow")
    try:
        accelerator.init_trackers(cfg.wandb_project, config=config, init_kwargs={"wandb": init})
    except Exception as e:  # wandb raises its own types and plain ones (timeouts) alike
        raise UserError(f"wandb could not start the run ({first_line(e)}): check the network and key, "
                        f"{WANDB_WAY_OUT}") from None
    if not cfg.wandb_log:
        return None
    return getattr(accelerator.get_tracker("wandb", unwrap=True), "id", None)  # None off the main process
