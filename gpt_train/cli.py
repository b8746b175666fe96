"""The `gpt-train` command (and `python train.py`): settings first, then the heavy imports.

Resolving the settings needs neither torch nor transformers, so `--help`, `--print_config` and
a mistyped setting answer in half a second instead of the six that importing torch,
transformers and Accelerate takes.
"""
import sys

from gpt_train.config import load_config
from gpt_train.errors import ClosedPipeTolerant, exit_on_user_error
from gpt_train.launch import stop_with_launcher


@exit_on_user_error
def train(argv=None):
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    stop_with_launcher()
    sys.stdout, sys.stderr = ClosedPipeTolerant(sys.stdout), ClosedPipeTolerant(sys.stderr)
    from gpt_train.train import train as run_training  # deferred: see the module docstring

    run = run_training(cfg)
    if run.stop.received:
        sys.exit(run.stop.exit_code)
    return run  # alive until the process exits: freeing a DDP model can hang a gloo run (errors._exit)


if __name__ == "__main__":
    train()
