"""async_save=True (gpt_train.saver): checkpoints written on a background thread are the ones the
loop would have written, a failure there stops the run in one line, and what it cannot run with
is refused before anything loads."""
import os

import pytest

from conftest import TINY_MODEL, one_line_error, read_metrics, sha256, tmpfs
from gpt_train import checkpoint
from gpt_train.cli import load_config
from gpt_train.commands import train as main
from gpt_train.errors import UserError
from gpt_train.start import check_together
from gpt_train.train import train

STATE_FILES = ("model.safetensors", "training_state/optimizer.bin", "training_state/scheduler.bin",
               "training_state/random_states_0.pkl")


def run_args(char_data, out_dir, *extra):
    return [f"--data_dir={char_data}", f"--out_dir={out_dir}", *TINY_MODEL, "--dropout=0.1", "--eval_interval=2",
            "--eval_iters=2", "--always_save_checkpoint=True", *extra]


@pytest.mark.slow
def test_a_background_save_writes_the_checkpoint_the_loop_would_have_byte_for_byte(char_data, tmp_path):
    for mode in ("False", "True"):
        train(load_config(run_args(char_data, tmp_path / mode, "--max_iters=6", f"--async_save={mode}")))
    for name in STATE_FILES:
        assert sha256(tmp_path / "True" / name) == sha256(tmp_path / "False" / name), name
    losses = {mode: [r["val/loss"] for r in read_metrics(tmp_path / mode, "eval")] for mode in ("True", "False")}
    assert losses["True"] == losses["False"] and len(losses["True"]) == 4
    state = checkpoint.read_trainer_state(str(tmp_path / "True"))  # its manifest checks every file
    assert state.iter_num == 6
    # and it resumes exactly: two more iterations from the background-saved state, as from the other
    for mode in ("False", "True"):
        train(load_config(run_args(char_data, tmp_path / mode, "--max_iters=8", "--init_from=resume")))
    assert sha256(tmp_path / "True" / "model.safetensors") == sha256(tmp_path / "False" / "model.safetensors")


def test_a_background_save_that_fills_the_disk_stops_the_run_in_one_line_keeping_the_last_checkpoint(
        char_data, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "700k") as disk:  # room for one checkpoint and the chart, not for a second
        out_dir = os.path.join(disk, "out")
        error = one_line_error(main, run_args(char_data, out_dir, "--max_iters=20", "--async_save=True",
                                              "--eval_iters=1"), capsys)
        # the background save's write or the loop's next one (its log, its chart) finds the disk full first
        assert error.startswith((f"error: could not write a checkpoint to {out_dir}: the disk is full",
                                 f"error: could not write to {out_dir}: the disk is full")), error
        saved = checkpoint.read_trainer_state(out_dir).iter_num
        assert error.endswith(f"the last checkpoint in {out_dir}, at iteration {saved}, is intact; continue with "
                              "--init_from=resume")
        assert not os.path.exists(os.path.join(out_dir, checkpoint.STAGING_DIR))


def test_async_save_under_fsdp_is_refused_before_anything_loads():
    with pytest.raises(UserError, match="async_save copies the whole training state .* set async_save=False"):
        check_together(load_config(["--async_save=True", "--device=cpu"]), "no", fsdp=True)
