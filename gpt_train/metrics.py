"""Where progress goes: the console, out_dir/metrics.jsonl and Accelerate's trackers (wandb).

One `Reporter` per run. It is the only place that asks whether this is the main process:
on the others every call is a no-op, so the loop can report unconditionally.

Not here: computing the numbers (the loop does that).
"""
import json
import os
import time


class Reporter:
    def __init__(self, accelerator, out_dir):
        self.accelerator = accelerator
        self.active = accelerator.is_main_process
        self.path = os.path.join(out_dir, "metrics.jsonl")

    def print(self, *args):
        if self.active:
            print(*args, flush=True)

    def log(self, event, iteration, **values):
        """Append one event to metrics.jsonl and send its numbers to the trackers."""
        if not self.active:
            return
        record = {"event": event, "iter": iteration, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(values, step=iteration)
