"""Where progress goes: the console, out_dir/metrics.jsonl and Accelerate's trackers (wandb).

One `Reporter` per run. It is the only place that asks whether this is the main process:
on the others every call is a no-op, so the loop can report unconditionally.

Not here: computing the numbers (the loop does that).
"""
import json
import os
import time

from gpt_train.errors import UserError, stdout_to_devnull


class Reporter:
    def __init__(self, accelerator, out_dir):
        """out_dir None: the console and trackers only (an evaluation writes no files)."""
        self.accelerator = accelerator
        self.active = accelerator.is_main_process
        self.path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None

    def print(self, *args):
        if self.active:
            try:
                print(*args, flush=True)
            except BrokenPipeError:  # `train.py ... | head` has read enough: train on, quietly
                stdout_to_devnull()

    def log(self, event, iteration, **values):
        """Append one event to metrics.jsonl and send its numbers to the trackers."""
        if not self.active:
            return
        if self.path:
            record = {"event": event, "iter": iteration, "time": round(time.time(), 3), **values}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(values, step=iteration)


WANDB_LOCAL_MODES = ("offline", "disabled", "dryrun")
WANDB_WAY_OUT = "or log locally with WANDB_MODE=offline and upload later with `wandb sync`"


def check_wandb_login():
    """wandb_log=True without a key would stop with wandb's traceback once the run has started."""
    if os.environ.get("WANDB_MODE", "").lower() in WANDB_LOCAL_MODES:
        return
    import wandb  # only runs that log to wandb pay for its import
    if not wandb.login(prompt=False, verify=False):
        raise UserError(f"wandb_log=True needs a W&B API key: run `wandb login` or set WANDB_API_KEY, {WANDB_WAY_OUT}")


def start_wandb(accelerator, project, config, init):
    """Accelerate's wandb tracker; wandb's own failure (no network, a bad key) as one line."""
    try:
        accelerator.init_trackers(project, config=config, init_kwargs={"wandb": init})
    except Exception as e:  # wandb raises its own types and plain ones (timeouts) alike
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"wandb could not start the run ({type(e).__name__}: {reason[:200]}): check the "
                        f"network and key, {WANDB_WAY_OUT}") from None
