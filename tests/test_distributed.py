"""Two real processes (DDP over gloo on CPU) against one process doing the same global batch."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import (ACCELERATE, ROOT, assert_every_process_reports_the_full_disk, free_port, read_metrics, run_script,
                      torch_threads, tree_digest)
from gpt_train import checkpoint
from gpt_train.cli import load_config
from gpt_train.train import train

pytestmark = pytest.mark.slow  # launched processes or lm-eval's task index: the full suite only

DDP_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def launch_two(*args, check=True, wrapper=()):
    return run_script(ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port(),
                      *wrapper, "train.py", *args, env={**DDP_ENV, "PYTHONPATH": ROOT}, check=check)


def test_two_process_ddp_matches_one_process(tiny_run, tmp_path, capsys):
    out_dir, args = tiny_run
    common = [*args, "--gradient_accumulation_steps=4", "--max_iters=12", "--eval_interval=6", "--eval_iters=3"]
    two = launch_two(*common)
    assert "2 process(es) on cpu, 2 micro-steps each" in two.stdout
    assert two.stdout.count("tokens per iteration will be: 512") == 1  # 4 x 4 x 32, printed once
    one_dir = str(tmp_path / "one")
    with torch_threads(1):
        train(load_config([*common, f"--out_dir={one_dir}"]))
    one = capsys.readouterr().out
    assert "1 process(es) on cpu, 4 micro-steps each" in one and "tokens per iteration will be: 512" in one

    # only the main process writes: one line per event
    assert [e["iter"] for e in read_metrics(out_dir, "train")] == list(range(12))
    for a, b in zip(read_metrics(out_dir, "eval"), read_metrics(one_dir, "eval"), strict=True):
        assert abs(a["val/loss"] - b["val/loss"]) < 1e-4 and abs(a["train/loss"] - b["train/loss"]) < 1e-4
    for a, b in zip(read_metrics(out_dir, "train"), read_metrics(one_dir, "train"), strict=True):
        assert abs(a["train/step_loss"] - b["train/step_loss"]) < 1e-4
    two_weights = load_file(os.path.join(out_dir, "model.safetensors"))
    one_weights = load_file(os.path.join(one_dir, "model.safetensors"))
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, atol=1e-5, rtol=1e-4)


def test_gradients_are_synchronised_only_on_the_last_micro_step(tiny_run):
    _, args = tiny_run
    result = run_script(ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port(),
                        "tests/ddp_sync_probe.py", *args, "--gradient_accumulation_steps=6", "--max_iters=3",
                        "--eval_interval=100", "--eval_iters=1", env={**DDP_ENV, "PYTHONPATH": ROOT})
    probes = [json.loads(line[6:]) for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert sorted(p["rank"] for p in probes) == [0, 1]
    for probe in probes:  # 3 micro-steps per process per iteration: only the last one all-reduces
        assert probe["micro_steps"] == 3 and probe["allreduces"] >= 3
        assert probe["micro_step_of_allreduce"] == [2]


def test_eval_only_gives_the_same_losses_from_one_and_two_processes(tiny_gpt2, bpe_data, tmp_path, capsys):
    # 5 eval batches: two processes split them 3 + 2, the padding batch weighing nothing.
    args = [f"--init_from={tiny_gpt2}", f"--data_dir={bpe_data}", "--eval_only=True", "--eval_iters=5",
            "--batch_size=2", "--block_size=32", "--device=cpu", "--compile=False"]
    two = launch_two(*args, f"--out_dir={tmp_path / 'two'}")
    assert "2 process(es) on cpu" in two.stdout and two.stdout.count("perplexity: train") == 1
    with torch_threads(1):
        train(load_config([*args, f"--out_dir={tmp_path / 'one'}"]))
    a, b = printed_losses(two.stdout), printed_losses(capsys.readouterr().out)
    assert len(a) == 4 and all(abs(x - y) < 1e-4 * max(1.0, y) for x, y in zip(a, b, strict=True)), (a, b)
    assert not (tmp_path / "two").exists()  # an evaluation writes nothing


def printed_losses(stdout):
    """train and val loss, train and val perplexity, as the evaluation prints them."""
    text = "\n".join(line for line in stdout.splitlines() if line.startswith(("step 0:", "perplexity:")))
    return [float(x) for x in re.findall(r"(?:loss|train|val) ([\d.]+)", text)]


def test_a_full_disk_on_one_process_fails_the_save_on_all_of_them(tiny_run):
    out_dir, args = tiny_run
    common = [*args, "--gradient_accumulation_steps=2", "--eval_interval=3", "--eval_iters=1"]
    train(load_config([*common, "--max_iters=3"]))
    state_before = tree_digest(os.path.join(out_dir, checkpoint.STATE_DIR), os.path.join(out_dir, "model.safetensors"))
    failed = launch_two(*common, "--max_iters=6", "--init_from=resume", check=False,
                        wrapper=["tests/full_disk_on_rank_1.py"])
    assert_every_process_reports_the_full_disk(failed, out_dir, last_checkpoint=3)
    assert tree_digest(os.path.join(out_dir, checkpoint.STATE_DIR),
                       os.path.join(out_dir, "model.safetensors")) == state_before
    assert checkpoint.read_trainer_state(out_dir).iter_num == 3
