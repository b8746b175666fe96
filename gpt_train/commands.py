"""The console commands that dispatch: `gpt-train` (and `python train.py`) and `gpt-prepare` (and
the data_prep scripts), with its chat sub-command. The top floor: nothing imports this module.

Each command resolves its settings before its heavy imports, so `--help`, `--print_config` and a
mistyped setting answer in half a second instead of the six that importing torch,
transformers and Accelerate takes.

Not here: the parser and --help (gpt_train.cli), the commands that do one thing and own their
`main` (gpt-sample, gpt-eval, gpt-bench, convert, plot, push).
"""
import difflib
import sys

from gpt_train.cli import load_config
from gpt_train.errors import ClosedPipeTolerant, UserError, exit_on_user_error
from gpt_train.launch import stop_with_launcher

CHAT = "chat"  # `gpt-prepare chat`: conversations, rendered and masked, not a text corpus


@exit_on_user_error
def train(argv=None):
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    stop_with_launcher()
    sys.stdout, sys.stderr = ClosedPipeTolerant(sys.stdout), ClosedPipeTolerant(sys.stderr)
    from gpt_train.train import train as run_training  # deferred: see the module docstring

    run = run_training(cfg)
    if run.stop and run.stop.received:  # an evaluation (eval_only) takes no signals
        sys.exit(run.stop.exit_code)
    return run  # alive until the process exits: freeing a DDP model can hang a gloo run (errors._exit)


@exit_on_user_error
def prepare(argv=None):
    """`gpt-prepare DATASET [--key=value ...]`: the data_prep scripts' work by dataset name."""
    from gpt_train.prepare import PREPARERS

    argv = sys.argv[1:] if argv is None else argv
    names = ", ".join([*PREPARERS, CHAT])
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: gpt-prepare DATASET [--key=value ...]   (DATASET: {names})\n"
              "       gpt-prepare DATASET --help   lists that dataset's settings")
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name == CHAT:
        from gpt_train.chat import prepare_chat
        prepare_chat(rest)
        return
    if name not in PREPARERS:
        near = difflib.get_close_matches(name, [*PREPARERS, CHAT], n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise UserError(f"unknown dataset {name!r}{hint} (known: {names})")
    from gpt_train.prepare import prepare_corpus
    prepare_corpus(rest, PREPARERS[name])


if __name__ == "__main__":
    train()
