"""auto_find_batch_size: out-of-memory errors injected from the test side (tests/out_of_memory.py,
as CUDA words them) make the probe settle on the largest micro-batch that fits; the run is then
the one that micro-batch, with the micro-steps that keep the tokens per iteration, would be."""
import os

import pytest
from transformers import GPT2Model

from conftest import one_line_error, read_metrics
from gpt_train import checkpoint
from gpt_train.auto_batch import candidates
from gpt_train.cli import load_config
from gpt_train.commands import train as main
from gpt_train.errors import UserError
from gpt_train.train import train
from out_of_memory import inject
from test_distributed import launch_two

SHORT = ["--max_iters=6", "--eval_interval=3", "--eval_iters=2", "--dropout=0.1", "--warmup_iters=2"]


@pytest.fixture
def out_of_memory_above(monkeypatch):
    def limit(rows):
        monkeypatch.setattr(GPT2Model, "forward", GPT2Model.forward)  # put back after the test
        inject(rows)
    return limit


def weights(out_dir):
    with open(os.path.join(out_dir, "model.safetensors"), "rb") as f:
        return f.read()


def test_candidates_divide_the_rows_of_an_iteration():
    assert candidates(12 * 40, 12) == [12, 10, 8, 6, 5, 4, 3, 2, 1]
    assert candidates(7, 12) == [7, 1]


def test_the_probe_settles_on_what_fits_and_the_run_is_that_micro_batchs(tiny_run, tmp_path, out_of_memory_above,
                                                                          capsys):
    """8 x 2 asked, more than 2 rows run out of memory: 2 x 8, the same 512 tokens per iteration;
    dropout on, so equal losses and weights also prove the probe left the RNGs as they were."""
    out_dir, args = tiny_run
    out_of_memory_above(2)
    train(load_config([*args, *SHORT, "--batch_size=8", "--gradient_accumulation_steps=2",
                       "--auto_find_batch_size=True"]))
    printed = capsys.readouterr().out
    assert ("auto_find_batch_size: micro-batch 8, 4 ran out of memory; 2 fits: 2 x 8 micro-steps per process "
            "(512 tokens per iteration, as set)") in printed
    assert "1 process(es) on cpu, 8 micro-steps each" in printed
    plain = str(tmp_path / "plain")
    # evaluations take as many rows as eval_iters=2 batches of 8 would: 8 batches of 2
    train(load_config([*args, *SHORT, f"--out_dir={plain}", "--batch_size=2", "--gradient_accumulation_steps=8",
                       "--eval_iters=8"]))
    for event, key in (("train", "train/step_loss"), ("eval", "val/loss")):
        assert [r[key] for r in read_metrics(out_dir, event)] == [r[key] for r in read_metrics(plain, event)]
    assert weights(out_dir) == weights(plain)


def test_the_settings_keep_what_was_asked_and_a_resume_probes_again(tiny_run, out_of_memory_above, capsys):
    out_dir, args = tiny_run
    out_of_memory_above(4)
    auto = [*args, *SHORT, "--batch_size=8", "--gradient_accumulation_steps=2", "--auto_find_batch_size=True"]
    train(load_config([*auto, "--max_iters=3"]))
    train(load_config([*auto, "--init_from=resume"]))
    printed = capsys.readouterr().out
    assert printed.count("4 fits: 4 x 4 micro-steps") == 2 and "resume changes batch_size" not in printed
    assert "the run trained with micro-batch" not in printed  # the same choice: the run continues exactly
    with open(os.path.join(out_dir, "training_config.json")) as f:
        text = f.read()
    assert '"batch_size": 8' in text and '"gradient_accumulation_steps": 2' in text
    assert checkpoint.read_trainer_state(out_dir).micro_batch == 4


@pytest.mark.parametrize("first", ["auto", "as set"])
def test_a_resume_that_finds_another_micro_batch_says_so(first, tiny_run, out_of_memory_above, capsys):
    out_dir, args = tiny_run
    auto = [*args, *SHORT, "--batch_size=8", "--gradient_accumulation_steps=2", "--auto_find_batch_size=True"]
    train(load_config([*(auto if first == "auto" else auto[:-1]), "--max_iters=3"]))  # nothing runs out: 8
    out_of_memory_above(4)  # a smaller GPU for the rest
    train(load_config([*auto, "--init_from=resume"]))
    printed = capsys.readouterr().out
    assert "the run trained with micro-batch 8 before: its batches from here on differ" in printed
    assert read_metrics(out_dir, "eval")[-1]["iter"] == 6


def test_a_micro_batch_that_fits_is_kept_as_is(tiny_run, capsys):
    out_dir, args = tiny_run
    train(load_config([*args, "--max_iters=2", "--auto_find_batch_size=True"]))
    assert "auto_find_batch_size: micro-batch 4 fits: 4 x 1 micro-steps per process" in capsys.readouterr().out


def test_nothing_fits_is_a_one_line_error_that_names_what_to_try(tiny_run, out_of_memory_above, capsys):
    out_dir, args = tiny_run
    out_of_memory_above(0)
    error = one_line_error(main, [*args, "--max_iters=2", "--auto_find_batch_size=True"], capsys)
    assert "even a micro-batch of 1 x 32 tokens runs out of memory on cpu" in error
    assert "--gradient_checkpointing=True" in error and not os.path.exists(os.path.join(out_dir, "model.safetensors"))


def test_streams_are_refused():
    with pytest.raises(UserError, match="auto_find_batch_size does not run with stream_from"):
        load_config(["--auto_find_batch_size=True", "--stream_from=docs.jsonl"])


@pytest.mark.slow
def test_two_processes_agree_when_only_one_runs_out_of_memory(tiny_run, tmp_path, monkeypatch):
    """Process 1 alone cannot hold more than 2 rows: both take 2 (DDP's all-reduce would hang on
    different micro-step counts), and the run matches one process at 2 x 8."""
    out_dir, args = tiny_run
    common = [*args, *SHORT, "--batch_size=8", "--gradient_accumulation_steps=4"]
    monkeypatch.setenv("OOM_ROWS", "2")
    monkeypatch.setenv("OOM_RANK", "1")
    result = launch_two(*common, "--auto_find_batch_size=True", wrapper=["tests/out_of_memory.py"])
    monkeypatch.delenv("OOM_ROWS")
    assert result.stdout.count("micro-batch 8, 4 ran out of memory; 2 fits: 2 x 8 micro-steps per process") == 1
    assert "2 process(es) on cpu, 8 micro-steps each" in result.stdout
    launch_two(*common, f"--out_dir={tmp_path / 'plain'}", "--batch_size=2", "--gradient_accumulation_steps=16",
               "--eval_iters=8")  # the rows of eval_iters=2 batches of 8
    for event, key in (("train", "train/step_loss"), ("eval", "val/loss")):
        assert [r[key] for r in read_metrics(out_dir, event)] == \
            pytest.approx([r[key] for r in read_metrics(tmp_path / "plain", event)], abs=1e-6)
