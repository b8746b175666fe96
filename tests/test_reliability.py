"""Reliability: exact resume after kill -9 and SIGTERM, crash-safe saves, NaN policy, guarded inputs.

Every kill here is a real signal to a real `python train.py`. Interpreter start-up dominates
those runs, so the many guarded-input cases mostly go through `main()` in-process.
"""
import contextlib
import errno
import functools
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import wandb
from transformers import GPT2LMHeadModel

import accelerate
import accelerate.checkpointing
from accelerate.state import AcceleratorState, GradientState, PartialState
from conftest import ROOT, TINY_CHECKPOINT_ITER, TINY_MODEL, forget_the_run, one_line_error, run_script, sha256, tree_digest
from gpt_train import checkpoint
from gpt_train.cli import load_config
from gpt_train.errors import UserError
from gpt_train.out_dir import has_checkpoint
from gpt_train.commands import train as main
from gpt_train.train import NonFiniteLoss, fit, setup, train

# Dropout on, so an exact resume also proves every RNG was restored.
RUN = [*TINY_MODEL, "--dropout=0.1", "--gradient_accumulation_steps=1", "--eval_interval=10",
       "--eval_iters=2", "--max_iters=30"]
ITER_LINE = "iter "


def start(args, env=None, wrapper=()):
    return subprocess.Popen([sys.executable, *wrapper, "train.py", *args], cwd=ROOT, text=True, bufsize=1,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})


def read_until(proc, predicate):
    """Lines the process printed, up to and including the first one `predicate` accepts."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if predicate(line, lines):
            return lines
    raise AssertionError(f"process ended ({proc.wait()}) before the expected line:\n{''.join(lines)}")


def losses_printed(output):
    """{iteration: 'iter N: loss X'} as printed, the timing cut off."""
    return {int(line.split()[1].rstrip(":")): line.split(",")[0]
            for line in output.splitlines() if line.startswith(ITER_LINE)}


@pytest.fixture(scope="module")
def straight(char_data, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce: its printout and out_dir."""
    out_dir = str(tmp_path_factory.mktemp("straight") / "out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # in process, at the thread count a launched run has too
        train(load_config([f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN]))
    forget_the_run()  # a module's fixture: the test it runs before may train in process too
    return printed.getvalue(), out_dir


def assert_resume_matches(resumed_output, resumed_dir, straight):
    straight_output, straight_dir = straight
    resumed, expected = losses_printed(resumed_output), losses_printed(straight_output)
    assert resumed and max(resumed) == 29
    assert resumed == {i: expected[i] for i in resumed}
    assert sha256(os.path.join(resumed_dir, "model.safetensors")) == \
        sha256(os.path.join(straight_dir, "model.safetensors"))


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(char_data, tmp_path, straight):
    out_dir = str(tmp_path / "out")
    args = [f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN]
    proc = start(args)
    # kill -9 a few iterations after the first checkpoint, mid-interval
    read_until(proc, lambda line, lines: line.startswith("iter 11:") and any("saving" in l for l in lines))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    saved = checkpoint.read_trainer_state(out_dir).iter_num
    assert saved in (10, 20)
    resumed = run_script("train.py", *args, "--init_from=resume")
    assert min(losses_printed(resumed.stdout)) == saved
    assert_resume_matches(resumed.stdout, out_dir, straight)


@pytest.mark.slow
def test_sigterm_saves_at_a_step_boundary_and_resume_continues_exactly(char_data, tmp_path, straight):
    out_dir = str(tmp_path / "out")
    args = [f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN]
    proc = start(args)
    read_until(proc, lambda line, lines: line.startswith("iter 3:"))
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait() == 128 + signal.SIGTERM, rest
    stopped = [line for line in rest.splitlines() if line.startswith("SIGTERM received: stopped after iteration")]
    assert len(stopped) == 1, rest
    last_done = int(stopped[0].split("iteration ")[1].split(";")[0])
    assert checkpoint.read_trainer_state(out_dir).iter_num == last_done + 1
    resumed = run_script("train.py", *args, "--init_from=resume")
    assert min(losses_printed(resumed.stdout)) == last_done + 1
    assert_resume_matches(resumed.stdout, out_dir, straight)


@pytest.mark.slow
@pytest.mark.parametrize("phase, survivor", [("staged", 10), ("moving", 20)])
def test_kill_during_a_save_leaves_one_whole_checkpoint(char_data, tmp_path, phase, survivor):
    """Killed before the commit, the previous checkpoint stays; after it, the new one is rolled in."""
    out_dir = str(tmp_path / "out")
    proc = start([f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN],
                 wrapper=("tests/hang_in_save.py", phase, "20"))
    read_until(proc, lambda line, lines: line.startswith(f"hanging in save: {phase}"))
    proc.kill()
    proc.wait()
    if phase == "moving":  # the kill left new model files next to no training_state/ at all
        assert not os.path.exists(os.path.join(out_dir, checkpoint.STATE_DIR))
    assert has_checkpoint(out_dir)  # so a restarted worker (resume_from_checkpoint=True) resumes it
    assert checkpoint.read_trainer_state(out_dir).iter_num == survivor  # recovers, then verifies
    assert not any(name.startswith(".checkpoint") or name.endswith(".old") for name in os.listdir(out_dir))
    # the model folder holds the weights this training state was saved with: nothing is mixed
    manifest = checkpoint.read_trainer_state(out_dir).files
    assert manifest["model.safetensors"]["sha256"] == sha256(os.path.join(out_dir, "model.safetensors"))
    GPT2LMHeadModel.from_pretrained(out_dir)


def test_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(tiny_run, monkeypatch):
    out_dir, args = tiny_run
    common = [*args, "--gradient_accumulation_steps=1", "--eval_interval=5", "--eval_iters=1"]
    train(load_config([*common, "--max_iters=5"]))
    before = tree_digest(os.path.join(out_dir, checkpoint.STATE_DIR))
    before[os.path.join(out_dir, "model.safetensors")] = sha256(os.path.join(out_dir, "model.safetensors"))

    def fill_the_disk(obj, f, **kwargs):  # half a file reaches the disk, then it is full
        with open(f, "wb") as out:
            out.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(accelerate.checkpointing, "save", fill_the_disk)
    with pytest.raises(UserError, match="the disk is full .* at iteration 5, is intact"):
        train(load_config([*common, "--max_iters=10", "--init_from=resume"]))
    after = tree_digest(os.path.join(out_dir, checkpoint.STATE_DIR))
    after[os.path.join(out_dir, "model.safetensors")] = sha256(os.path.join(out_dir, "model.safetensors"))
    assert after == before
    assert not os.path.exists(os.path.join(out_dir, checkpoint.STAGING_DIR))
    assert checkpoint.read_trainer_state(out_dir).iter_num == 5


def test_nan_loss_stops_naming_the_iteration_and_keeps_the_last_checkpoint(tiny_run):
    out_dir, args = tiny_run
    common = [*args, "--gradient_accumulation_steps=1", "--eval_interval=5", "--eval_iters=1"]
    train(load_config([*common, "--max_iters=5"]))
    before = tree_digest(out_dir)
    # The run goes on with a step size that turns the weights to garbage: the next loss is NaN.
    blow_up = [*common, "--init_from=resume", "--max_iters=10", "--learning_rate=1e9", "--warmup_iters=0",
               "--min_lr=0"]
    with pytest.raises(NonFiniteLoss, match="loss is nan at iteration 6: stopping"):
        train(load_config(blow_up))
    after = tree_digest(out_dir)
    # nothing of the diverged steps reached the checkpoint
    weights = os.path.join(out_dir, "model.safetensors")
    assert after[weights] == before[weights]
    assert checkpoint.read_trainer_state(out_dir).iter_num == 5


@pytest.mark.parametrize("from_a_checkpoint", [False, True], ids=["from scratch", "resumed"])
def test_the_advice_after_a_nan_stop_works_when_followed(tiny_run, capsys, from_a_checkpoint):
    out_dir, args = tiny_run
    common = [*args, "--eval_interval=5", "--eval_iters=1", "--warmup_iters=0", "--min_lr=0"]
    if from_a_checkpoint:
        train(load_config([*common, "--max_iters=5"]))
        forget_the_run()
    first = [*common, "--max_iters=10", "--learning_rate=1e9"] + (["--init_from=resume"] if from_a_checkpoint else [])
    error = one_line_error(main, first, capsys)
    if from_a_checkpoint:
        assert "nothing was saved after the last good checkpoint in" in error and "(iteration 5)" in error
        advice = "--init_from=resume"
    else:  # no checkpoint to continue: start again, which the run's own files would otherwise refuse
        assert f"no checkpoint was written to {out_dir}" in error and "--init_from=resume" not in error
        advice = "--overwrite_output_dir=True"
    assert f"Lower learning_rate and {'continue from it' if from_a_checkpoint else 'start the run again'} with " \
           f"{advice}" in error
    train(load_config([*common, "--max_iters=10", "--learning_rate=3e-3", advice]))
    assert checkpoint.read_trainer_state(out_dir).iter_num == 10


def test_skip_nonfinite_steps_skips_and_counts_instead_of_updating(tiny_run, capsys):
    out_dir, args = tiny_run
    run = setup(load_config([*args, "--gradient_accumulation_steps=1", "--eval_interval=100", "--eval_iters=1",
                             "--max_iters=4", "--learning_rate=1e9", "--warmup_iters=0", "--min_lr=0",
                             "--skip_nonfinite_steps=True"]))
    with pytest.raises(NonFiniteLoss, match="val loss is nan at iteration 4"):  # never saved
        fit(run)
    printed = capsys.readouterr().out
    assert "iter 3: non-finite loss, step skipped (3 so far)" in printed
    assert run.skipped_steps == 3
    # the NaN steps never reached the weights: only step 0's (finite, huge) update did
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert not os.path.exists(os.path.join(out_dir, "model.safetensors"))


@pytest.mark.slow
def test_resume_continues_the_same_wandb_run(tiny_run, tmp_path, monkeypatch):
    out_dir, args = tiny_run
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(name, value)
    common = [*args, "--gradient_accumulation_steps=1", "--eval_interval=2", "--eval_iters=1", "--wandb_log=True"]
    try:
        train(load_config([*common, "--max_iters=2"]))
        first = checkpoint.read_trainer_state(out_dir).tracker_run_id
        AcceleratorState._reset_state(True), GradientState._reset_state(), PartialState._reset_state()  # a new run
        train(load_config([*common, "--max_iters=4", "--init_from=resume"]))
    finally:
        wandb.teardown()  # wandb keeps its settings (WANDB_DIR) process-wide; later tests have their own
    runs = sorted(d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-"))
    # two runs within one second share a folder name, and wandb suffixes the second "-1"
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first}(-\d+)?", d) for d in runs), runs
    assert checkpoint.read_trainer_state(out_dir).tracker_run_id == first


# ---- guarded inputs: one line, non-zero exit, no traceback, nothing changed in out_dir or data/


@pytest.fixture(scope="module")
def checkpointed(tiny_checkpoint):
    """A finished tiny run's out_dir, copied by each test that needs one."""
    return tiny_checkpoint


def bad_token_ids(data_dir):
    val = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=np.uint16)
    val[-1] = 65  # one id past the 65-character vocabulary
    val.tofile(os.path.join(data_dir, "val.bin"))


def truncate_model(out_dir):
    with open(os.path.join(out_dir, "model.safetensors"), "r+b") as f:
        f.truncate(1000)


def scramble_optimizer(out_dir):
    path = os.path.join(out_dir, checkpoint.STATE_DIR, "optimizer.bin")
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(b"not a torch file" * (size // 16) + b"\0" * (size % 16))


def malicious_meta(data_dir):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    with open(os.path.join(data_dir, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": 65, "x": RunsCode()}, f)


def remove_val_bin(data_dir):
    os.remove(os.path.join(data_dir, "val.bin"))


def odd_sized_bin(data_dir):
    with open(os.path.join(data_dir, "val.bin"), "ab") as f:
        f.write(b"\0")


def tiny_val_bin(data_dir):
    np.arange(10, dtype=np.uint16).tofile(os.path.join(data_dir, "val.bin"))


def remove_training_state(out_dir):
    shutil.rmtree(os.path.join(out_dir, checkpoint.STATE_DIR))


def garble_trainer_state(out_dir):
    with open(os.path.join(out_dir, checkpoint.STATE_DIR, checkpoint.TRAINER_STATE), "w") as f:
        f.write('{"iter_num": 2, ')


def swap_model_weights(out_dir):
    """Same size, other content: as if another run's model.safetensors had been copied in."""
    with open(os.path.join(out_dir, "model.safetensors"), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x01\x02\x03\x04")


def edit_json(name, whole=None, **values):
    """Damage that rewrites out_dir's JSON file `name` by hand: `values` set, or `whole` for all of it."""
    def edit(out_dir):
        path = os.path.join(out_dir, name)
        with open(path) as f:
            saved = json.load(f)
        with open(path, "w") as f:
            json.dump(whole if whole is not None else {**saved, **values}, f)
    return edit


edit_state = functools.partial(edit_json, os.path.join(checkpoint.STATE_DIR, checkpoint.TRAINER_STATE))
edit_settings = functools.partial(edit_json, "training_config.json")


GUARDED = {
    # name: (extra args, damage done to the copies of out_dir and data/ first, part of the message, via CLI)
    "unknown setting": (["--n_layr=2"], None, None, "unknown setting 'n_layr'", False),
    "non-positive eval_iters": (["--eval_iters=0"], None, None, "eval_iters must be at least 1", False),
    "min_lr above learning_rate": (["--min_lr=1.0"], None, None, "min_lr (1.0) is above learning_rate", False),
    "missing bin": ([], None, remove_val_bin, "val.bin not found", False),
    "odd-sized bin": ([], None, odd_sized_bin, "not a whole number of uint16", False),
    "dataset shorter than a block": ([], None, tiny_val_bin, "fewer than block_size+1", False),
    "resume, nothing to resume": (["--init_from=resume"], remove_training_state, None, "nothing to resume", False),
    "resume, garbled trainer_state": (["--init_from=resume"], garble_trainer_state, None, "is corrupt", False),
    "resume, mixed weights": (["--init_from=resume"], swap_model_weights, None, "sha256 differs", False),
    "wrong type": (["--max_iters=ten"], None, None, "max_iters must be int", False),
    "float16 on cpu": (["--dtype=float16"], None, None, "dtype='float16' is not supported on CPU", False),
    "token id beyond vocab": ([], None, bad_token_ids, "holds token id 65 but the model has 65 ids", True),
    "malicious meta.pkl": ([], None, malicious_meta, "is not a plain nanoGPT meta.pkl", False),
    "resume, other shape": (["--init_from=resume", "--n_layer=3"], None, None,
                            "has n_layer=2 but the settings say n_layer=3", False),
    "resume, partial": (["--init_from=resume"], truncate_model, None, "is damaged: model.safetensors", False),
    "resume, corrupt state": (["--init_from=resume"], scramble_optimizer, None,
                              "is damaged: training_state/optimizer.bin does not match", True),
    # hand-edited or damaged JSON: the wrong types, null, out of range (issue 23's tracebacks)
    "trainer_state iter_num a string": (["--init_from=resume"], edit_state(iter_num="2"), None,
                                        "iter_num must be a whole number >= 0, got '2'", False),
    "trainer_state iter_num null": (["--init_from=resume"], edit_state(iter_num=None), None,
                                    "iter_num must be a whole number >= 0, got None", False),
    "trainer_state negative iteration": (["--init_from=resume"], edit_state(iter_num=-1), None,
                                         "iter_num must be a whole number >= 0, got -1", False),
    "trainer_state best_val_loss a list": (["--init_from=resume"], edit_state(best_val_loss=[1]), None,
                                           "best_val_loss must be a number, got [1]", False),
    "trainer_state files a list": (["--init_from=resume"], edit_state(files=["model.safetensors"]), None,
                                   "files must be an object", False),
    "trainer_state a file's size a string": (["--init_from=resume"],
                                             edit_state(files={"model.safetensors": {"size": "big"}}), None,
                                             "its entry for 'model.safetensors' is not {size, sha256}", False),
    "trainer_state a list": (["--init_from=resume"], edit_state(whole=[1, 2]), None, "not a JSON object", False),
    "training_config batch_size a string": (["--init_from=resume"], edit_settings(batch_size="4"), None,
                                            "batch_size must be int, got str '4' (in ", False),
    "training_config batch_size null": (["--init_from=resume"], edit_settings(batch_size=None), None,
                                        "batch_size must be int, got NoneType None (in ", False),
    "training_config eval_interval negative": (["--init_from=resume"], edit_settings(eval_interval=-5), None,
                                               "eval_interval must be at least 1, got -5 (from ", False),
    "training_config dropout a dict": (["--init_from=resume"], edit_settings(dropout={"p": 0}), None,
                                       "dropout must be float, got dict", False),
    "negative seed": (["--seed=-1"], None, None, "seed must be between 0 and 4294967295", False),
    "out_dir is a file": (["--out_dir=README.md"], None, None, "out_dir README.md is a file, not a folder", False),
    "a micro-batch beyond any memory": (["--batch_size=1000000000", "--overwrite_output_dir=False",
                                         "--out_dir=never-written"], None, None,
                                        "this run needs ~172,416.0 GB at the peak (weights 0.0, gradients 0.0", False),
    "a model beyond any memory": (["--n_layer=48", "--n_embd=32768", "--n_head=32", "--out_dir=never-written"],
                                  None, None, "no setting here fits it: shard it over several GPUs", False),
    "a new run over a run": (["--overwrite_output_dir=False"], None, None, "holds another training run (a "
                             f"checkpoint at iteration {TINY_CHECKPOINT_ITER}): continue it with --init_from=resume",
                             True),
}


def test_a_bug_while_loading_the_training_state_is_not_called_a_corrupt_checkpoint(checkpointed, tmp_path,
                                                                                    monkeypatch):
    out_dir = str(tmp_path / "out")
    shutil.copytree(checkpointed, out_dir)

    def buggy_load_state(self, input_dir=None, **kwargs):
        raise TypeError("a bug in gpt-train or Accelerate")

    monkeypatch.setattr(accelerate.Accelerator, "load_state", buggy_load_state)
    with pytest.raises(TypeError, match="a bug in gpt-train"):  # a traceback to report, not "corrupt"
        train(load_config([f"--out_dir={out_dir}", "--init_from=resume", "--max_iters=4"]))


def test_a_failing_save_turns_the_progress_bars_back_on(tiny_run, monkeypatch):
    from transformers import PreTrainedModel
    from transformers.utils import logging as hf_logging
    out_dir, args = tiny_run

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(UserError, match="the disk is full"):
        train(load_config([*args, "--max_iters=2", "--eval_interval=2", "--eval_iters=1"]))
    assert hf_logging.is_progress_bar_enabled()


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if GUARDED[case][4] else case
                                  for case in GUARDED])
def test_bad_input_gets_one_line_and_changes_no_file(case, checkpointed, char_data, tmp_path, capsys):
    """Through `python train.py`, or its main() in-process where interpreter start-up would dominate."""
    extra, damage_out, damage_data, message, via_cli = GUARDED[case]
    out_dir, data_dir = str(tmp_path / "out"), str(tmp_path / "data")
    shutil.copytree(checkpointed, out_dir)
    shutil.copytree(char_data, data_dir)
    for damage, folder in ((damage_out, out_dir), (damage_data, data_dir)):
        if damage:
            damage(folder)
    before = tree_digest(out_dir, data_dir)
    # overwrite_output_dir: even a run allowed to replace out_dir's run changes nothing when it fails
    argv = [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL, "--max_iters=4",
            "--overwrite_output_dir=True", *extra]
    error = one_line_error(main, argv, capsys, ["train.py", *argv] if via_cli else None)
    assert message in error
    assert tree_digest(out_dir, data_dir) == before
    assert not os.path.exists(os.path.join(ROOT, "pwned"))
