"""optimizer='adamw_8bit': bitsandbytes' AdamW with 8-bit moments trains, saves its quantised state,
resumes exactly, and is refused in one line where it cannot run."""
import os
import sys

import pytest
import torch
from transformers import pipeline

from conftest import TINY_MODEL, forget_the_run, one_line_error, read_metrics, sha256
from gpt_train.cli import load_config
from gpt_train.errors import UserError
from gpt_train.optim import make_optimizers
from gpt_train.commands import train as main
from gpt_train.train import setup, train

# n_embd=64: the blocks' matrices and the embedding reach bitsandbytes' 4,096 elements for 8-bit state
EIGHT_BIT = [*TINY_MODEL, "--n_embd=64", "--optimizer=adamw_8bit", "--eval_interval=5", "--eval_iters=2",
             "--dropout=0.1"]


def eight_bit_args(char_data, out_dir, *extra):
    return [f"--data_dir={char_data}", f"--out_dir={out_dir}", *EIGHT_BIT, *extra]


def test_adamw_8bit_keeps_8bit_moments_for_matrices_and_32bit_for_small_tensors(char_data, tmp_path):
    run = setup(load_config(eight_bit_args(char_data, tmp_path / "out", "--weight_decay=0.05", "--beta2=0.98")))
    (optimizer,) = run.optimizers
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"], decay["betas"]) == (0.05, 0.0, (0.9, 0.98))
    model = run.accelerator.unwrap_model(run.model)
    x, y = run.sampler.batch("train", run.sampler.iteration_offsets("train", 0, 1)[0])
    model(input_ids=x, labels=y).loss.backward()
    optimizer.step()
    names = {id(p): name for name, p in model.named_parameters()}
    kinds = {names[id(p)]: state["state1"].dtype for p, state in optimizer.optimizer.state.items()}
    assert kinds["transformer.h.0.attn.c_attn.weight"] == kinds["transformer.wte.weight"] == torch.uint8
    assert kinds["transformer.h.0.ln_1.weight"] == torch.float32  # under 4,096 elements


def test_adamw_8bit_learns_resumes_exactly_and_leaves_a_plain_folder(char_data, tmp_path, capsys):
    """dropout on: the same losses and byte-identical weights prove the quantised state came back whole."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(load_config(eight_bit_args(char_data, straight, "--max_iters=10")))
    forget_the_run()
    train(load_config(eight_bit_args(char_data, resumed, "--max_iters=5")))
    forget_the_run()
    capsys.readouterr()
    train(load_config(eight_bit_args(char_data, resumed, "--max_iters=10", "--init_from=resume")))
    assert "resuming from iteration 5" in capsys.readouterr().out
    losses = {e["iter"]: e["train/step_loss"] for e in read_metrics(resumed, "train")}
    assert losses == {e["iter"]: e["train/step_loss"] for e in read_metrics(straight, "train")}
    assert sha256(os.path.join(resumed, "model.safetensors")) == sha256(os.path.join(straight, "model.safetensors"))
    evals = read_metrics(straight, "eval")
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.5
    text = pipeline("text-generation", model=straight, device="cpu")("ROMEO:", max_new_tokens=5)[0]["generated_text"]
    assert text.startswith("ROMEO:")


def test_adamw_8bit_without_bitsandbytes_is_one_line(char_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    error = one_line_error(main, eight_bit_args(char_data, tmp_path / "out"), capsys)
    assert "optimizer='adamw_8bit' needs bitsandbytes" in error and "pip install" in error
    assert not (tmp_path / "out").exists()


def test_adamw_8bit_where_it_does_not_run_is_refused(char_data, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="optimizer='adamw_8bit' does not run on mps"):
        make_optimizers(torch.nn.Linear(2, 2), load_config(eight_bit_args(char_data, tmp_path / "out")), "mps")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch exports for an FSDP config
    with pytest.raises(UserError, match="optimizer='adamw_8bit' does not run under FSDP"):
        train(load_config(eight_bit_args(char_data, tmp_path / "out")))
    assert not (tmp_path / "out").exists()
