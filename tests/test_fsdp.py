"""FSDP2 for real, on two CPU processes: `accelerate launch` with accelerate_configs/fsdp_8xa100.yaml.

Accelerate only enables FSDP on accelerators; tests/fsdp_cpu_launch.py lifts that one gate so
PyTorch's FSDP2 runs over gloo. Everything else is the real launcher, plugin, sharding, sharded
training state and gathered model folder.
"""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, pipeline

from conftest import (ACCELERATE, ROOT, TINY_MODEL, assert_every_process_reports_the_full_disk, free_port, read_metrics,
                      run_script, sha256, tree_digest)
from gpt_train import checkpoint
from gpt_train.cli import load_config
from gpt_train.errors import UserError
from gpt_train.train import train

pytestmark = pytest.mark.slow  # launched processes or lm-eval's task index: the full suite only

FSDP_CONFIG = os.path.join(ROOT, "accelerate_configs", "fsdp_8xa100.yaml")
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
RUN = ["--gradient_accumulation_steps=2", "--eval_interval=3", "--eval_iters=2", "--learning_rate=3e-3"]


def launch_fsdp(out_dir, *args, processes=2, check=True, wrapper=()):
    return run_script(ACCELERATE, "launch", "--config_file", FSDP_CONFIG, "--num_processes", str(processes),
                      "--main_process_port", free_port(), *wrapper, "tests/fsdp_cpu_launch.py",
                      f"--out_dir={out_dir}", *args, env=ENV, check=check)


@pytest.fixture(scope="module")
def fsdp_runs(char_data, tmp_path_factory):
    """An uninterrupted FSDP run of 6 iterations in float32, and one stopped at 3 and resumed."""
    tmp = tmp_path_factory.mktemp("fsdp")
    args = [f"--data_dir={char_data}", *TINY_MODEL, *RUN, "--dtype=float32"]
    straight = launch_fsdp(tmp / "straight", *args, "--max_iters=6")
    launch_fsdp(tmp / "resumed", *args, "--max_iters=3")
    stopped = sha256(tmp / "resumed" / "model.safetensors")
    resumed = launch_fsdp(tmp / "resumed", *args, "--max_iters=6", "--init_from=resume")
    return tmp, args, straight, resumed, stopped


def losses_by_iter(out_dir, event, key):
    """The last value logged for each iteration: a resumed run logs its first evaluation again."""
    return {e["iter"]: e[key] for e in read_metrics(out_dir, event)}


def test_fsdp_shards_the_training_state_and_publishes_a_full_model(fsdp_runs):
    tmp, _, straight, _, _ = fsdp_runs
    assert "2 process(es) on cpu, 1 micro-steps each" in straight.stdout
    out_dir = tmp / "straight"
    state = os.listdir(out_dir / checkpoint.STATE_DIR)
    # each rank wrote its own shard of the model and of the optimizer state, nothing was gathered
    assert sorted(os.listdir(out_dir / checkpoint.STATE_DIR / "pytorch_model_fsdp_0")) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "optimizer_0" in state and "model.safetensors" not in state
    # the model folder is whole: every tensor at full shape, loadable and usable without FSDP
    model, info = GPT2LMHeadModel.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    weights = load_file(out_dir / "model.safetensors")
    assert weights["transformer.h.1.mlp.c_fc.weight"].shape == (32, 128)
    generator = pipeline("text-generation", model=str(out_dir), device="cpu")
    text = generator("ROMEO:", max_new_tokens=20, do_sample=True)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_fsdp_resume_continues_exactly(fsdp_runs):
    tmp, _, _, resumed, stopped = fsdp_runs
    assert "iter 2:" not in resumed.stdout and "iter 5:" in resumed.stdout
    assert stopped != sha256(tmp / "resumed" / "model.safetensors")
    for event, key in (("train", "train/step_loss"), ("eval", "val/loss")):
        assert losses_by_iter(tmp / "resumed", event, key) == losses_by_iter(tmp / "straight", event, key)
    assert sha256(tmp / "resumed" / "model.safetensors") == sha256(tmp / "straight" / "model.safetensors")


def test_fsdp_matches_one_process_on_the_same_global_batch(fsdp_runs, tmp_path):
    tmp, args, *_ = fsdp_runs
    train(load_config([*args, "--max_iters=6", f"--out_dir={tmp_path / 'one'}"]))
    for event, key in (("train", "train/step_loss"), ("eval", "val/loss")):
        fsdp, one = losses_by_iter(tmp / "straight", event, key), losses_by_iter(tmp_path / "one", event, key)
        assert fsdp.keys() == one.keys()
        for i in one:
            assert abs(fsdp[i] - one[i]) < 1e-4, (event, i, fsdp[i], one[i])
    fsdp_weights = load_file(tmp / "straight" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "one" / "model.safetensors").items():
        torch.testing.assert_close(fsdp_weights[name], tensor, atol=1e-5, rtol=1e-4)
    # a checkpoint saved without FSDP is not resumed under FSDP: a one-line error says what to run
    refused = launch_fsdp(tmp_path / "one", *args, "--init_from=resume", "--max_iters=9", check=False)
    assert refused.returncode != 0  # the launcher turns the processes' exit status 2 into its own 1
    lines = refused.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors and all(line.startswith(f"error: {tmp_path / 'one' / checkpoint.STATE_DIR} was saved without "
                                          "FSDP: resume it without FSDP") for line in errors)
    assert "Traceback" not in "\n".join(lines[:lines.index(errors[0])])  # only the launcher's own, after it


def test_an_fsdp_checkpoint_resumes_on_another_process_count_but_not_without_fsdp(fsdp_runs, tmp_path):
    tmp, args, *_ = fsdp_runs
    out_dir = tmp_path / "copy"
    shutil.copytree(tmp / "resumed", out_dir)
    before = tree_digest(out_dir)
    with pytest.raises(UserError, match=r"was saved by FSDP: resume it under FSDP, with any number of processes"):
        train(load_config([*args, f"--out_dir={out_dir}", "--init_from=resume", "--max_iters=9"]))
    assert tree_digest(out_dir) == before
    # torch.distributed.checkpoint reshards the 2-process state onto 1 process; bf16 from the YAML this time
    one = launch_fsdp(out_dir, *args, "--init_from=resume", "--max_iters=9", "--dtype=auto", processes=1)
    assert "1 process(es) on cpu, 2 micro-steps each, precision bf16" in one.stdout
    assert checkpoint.read_trainer_state(out_dir).iter_num == 9
    # Accelerate's own FSDP2 policy would cast the loss to bf16: steps of 1/64 here, so the mean
    # of the 2 micro-steps' losses would be a multiple of 1/128
    losses = [loss for i, loss in losses_by_iter(out_dir, "train", "train/step_loss").items() if i >= 6]
    assert len(losses) == 3 and not all((loss * 256).is_integer() for loss in losses), losses


def test_a_full_disk_on_one_process_fails_the_fsdp_save_on_all_of_them(fsdp_runs, tmp_path):
    tmp, args, *_ = fsdp_runs
    out_dir = tmp_path / "copy"
    shutil.copytree(tmp / "straight", out_dir)
    state_before = tree_digest(out_dir / checkpoint.STATE_DIR, out_dir / "model.safetensors")
    failed = launch_fsdp(out_dir, *args, "--init_from=resume", "--max_iters=9", check=False,
                         wrapper=["tests/full_disk_on_rank_1.py"])
    assert_every_process_reports_the_full_disk(failed, out_dir, last_checkpoint=6)
    assert tree_digest(out_dir / checkpoint.STATE_DIR, out_dir / "model.safetensors") == state_before
    assert checkpoint.read_trainer_state(out_dir).iter_num == 6


def test_fine_tuning_a_pretrained_folder_under_fsdp_matches_one_process(tiny_gpt2, bpe_data, tmp_path):
    """fsdp_8xa100.yaml loads pretrained weights on rank 0 only and broadcasts them (cpu_ram_efficient_loading)."""
    args = [f"--data_dir={bpe_data}", f"--init_from={tiny_gpt2}", "--device=cpu", "--compile=False", "--dtype=float32",
            "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=2", "--max_iters=4",
            "--eval_interval=2", "--eval_iters=2", "--learning_rate=1e-3", "--log_interval=1"]
    launch_fsdp(tmp_path / "fsdp", *args)
    train(load_config([*args, f"--out_dir={tmp_path / 'one'}"]))
    for event, key in (("train", "train/step_loss"), ("eval", "val/loss")):
        fsdp, one = losses_by_iter(tmp_path / "fsdp", event, key), losses_by_iter(tmp_path / "one", event, key)
        assert fsdp.keys() == one.keys() and all(abs(fsdp[i] - one[i]) < 1e-4 for i in one), (fsdp, one)
    fsdp_weights = load_file(tmp_path / "fsdp" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "one" / "model.safetensors").items():
        torch.testing.assert_close(fsdp_weights[name], tensor, atol=1e-5, rtol=1e-4)
