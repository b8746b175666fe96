"""The training loop end to end on a tiny GPT-2: learning, eval_only, resume, biases, wandb."""
import json
import math
import os

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from conftest import one_line_error, read_metrics
from gpt_train.cli import load_config
from gpt_train.commands import train as main
from gpt_train.optim import lr_multiplier
from gpt_train.train import train


def run(args):
    return train(load_config(args))


def test_tiny_model_learns_and_leaves_a_model_folder(tiny_run, capsys):
    out_dir, args = tiny_run
    run([*args, "--gradient_accumulation_steps=4", "--max_iters=80", "--eval_interval=40", "--eval_iters=4"])
    printed = capsys.readouterr().out
    assert "tokens per iteration will be: 512" in printed  # 4 x 4 x 32
    assert "step 80: train loss" in printed and "iter 79: loss" in printed
    evals = read_metrics(out_dir, "eval")
    assert [e["iter"] for e in evals] == [0, 40, 80]
    assert evals[0]["val/loss"] == pytest.approx(math.log(65), abs=0.15)  # uniform over 65 chars
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.8
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "training_config.json", "training_state/trainer_state.json"):
        assert os.path.isfile(os.path.join(out_dir, name)), name
    with open(os.path.join(out_dir, "training_config.json")) as f:
        assert json.load(f)["n_embd"] == 32
    model = GPT2LMHeadModel.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert model.config.n_layer == 2 and tokenizer.decode(tokenizer("ROMEO:")["input_ids"]) == "ROMEO:"


def test_eval_only_evaluates_once_and_writes_nothing(tiny_run, capsys):
    out_dir, args = tiny_run
    run([*args, "--eval_only=True", "--eval_iters=3"])
    printed = capsys.readouterr().out
    assert printed.count("step 0: train loss") == 1 and "perplexity: train" in printed and "iter 0" not in printed
    assert not os.path.exists(out_dir)


def test_resume_continues_from_the_saved_iteration_with_the_same_losses(tiny_run, tmp_path):
    out_dir, args = tiny_run
    common = [*args, "--eval_interval=10", "--eval_iters=2", "--gradient_accumulation_steps=2"]
    run([*common, "--max_iters=20"])
    run([*common, "--max_iters=30", "--init_from=resume"])
    resumed = read_metrics(out_dir, "train")
    assert [e["iter"] for e in resumed] == list(range(0, 30))
    straight_dir = str(tmp_path / "straight")
    run([*common, "--max_iters=30", f"--out_dir={straight_dir}"])
    straight = read_metrics(straight_dir, "train")
    assert [e["train/step_loss"] for e in resumed[20:]] == [e["train/step_loss"] for e in straight[20:]]
    assert read_metrics(out_dir, "eval")[-1]["val/loss"] == read_metrics(straight_dir, "eval")[-1]["val/loss"]


def test_resume_with_nothing_to_resume_is_a_clear_error(tiny_run, capsys):
    out_dir, args = tiny_run
    assert one_line_error(main, [*args, "--init_from=resume"], capsys).startswith(
        f"error: nothing to resume in {out_dir}")
    assert not os.path.exists(out_dir)


@pytest.mark.parametrize("bias", [False, True])
def test_bias_setting_decides_whether_biases_exist_in_effect(tiny_run, bias):
    out_dir, args = tiny_run
    trained = run([*args, "--max_iters=5", "--eval_interval=5", "--eval_iters=1", f"--bias={bias}"])
    model = trained.accelerator.unwrap_model(trained.model)
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    assert all(p.requires_grad == bias for p in biases.values())
    assert all(torch.count_nonzero(p) == 0 for p in biases.values()) != bias
    reloaded = GPT2LMHeadModel.from_pretrained(out_dir)  # still a plain GPT-2 folder
    x = torch.randint(65, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x).logits, model.eval()(x).logits)


def test_lr_schedule_is_nanogpts():
    cfg = load_config(["--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=10", "--lr_decay_iters=100"])

    def nanogpt_get_lr(it):  # nanoGPT train.py's get_lr, the schedule its published runs used
        if it < 10:
            return 1e-3 * (it + 1) / (10 + 1)
        if it > 100:
            return 1e-4
        coeff = 0.5 * (1.0 + math.cos(math.pi * (it - 10) / (100 - 10)))
        return 1e-4 + coeff * (1e-3 - 1e-4)

    factor = lr_multiplier(cfg)
    for it in (0, 5, 9, 10, 11, 50, 99, 100, 101, 500):
        assert 1e-3 * factor(it) == pytest.approx(nanogpt_get_lr(it), rel=1e-12)
    constant = lr_multiplier(load_config(["--decay_lr=False"]))
    assert constant(0) == constant(10**6) == 1.0


@pytest.mark.parametrize("warmup, decay", [(100, 30), (30, 30), (0, 0)])
def test_a_warmup_that_outlasts_the_decay_runs_as_in_nanogpt(warmup, decay):
    """nanoGPT accepts it (`--max_iters=30 --lr_decay_iters=30` on its shakespeare preset, warmup
    100): the rate warms up the whole run. Defined at every iteration, no division by zero."""
    cfg = load_config(["--learning_rate=1e-3", "--min_lr=1e-4", f"--warmup_iters={warmup}",
                       f"--lr_decay_iters={decay}"])
    factor = lr_multiplier(cfg)
    for it in range(0, 150):
        expected = (it + 1) / (warmup + 1) if it < warmup else 0.1
        assert factor(it) == pytest.approx(expected, rel=1e-12), it


def test_warmup_outlasting_the_decay_is_said_in_one_line(tiny_run, capsys):
    out_dir, args = tiny_run
    run([*args, "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--warmup_iters=100",
         "--lr_decay_iters=30"])
    assert ("warning: warmup_iters (100) outlasts lr_decay_iters (30): the learning rate rises until iteration "
            "100, then drops to min_lr") in capsys.readouterr().out


@pytest.mark.slow
def test_wandb_offline_run_is_written(tiny_run, tmp_path, monkeypatch):
    out_dir, args = tiny_run
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run([*args, "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--wandb_log=True",
         "--wandb_project=tiny", "--wandb_run_name=test-run"])
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    files = os.listdir(tmp_path / "wandb" / runs[0])
    assert any(f.endswith(".wandb") for f in files)
    with open(os.path.join(out_dir, "training_state", "trainer_state.json")) as f:
        assert json.load(f)["tracker_run_id"] in runs[0]
