"""The cloud recipes in recipes/ (SkyPilot, Kubeflow Trainer v2, Hugging Face Jobs) cannot drift
from what is tested: each one's training command is read from the file as its engine would read
it, checked (entry point, preset, settings, resume), and run on CPU with the environment that
engine gives it: two processes on one "node", the GPT-2 preset shrunk to a tiny model."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TINY_MODEL, free_port
from gpt_train.cli import load_config
from gpt_train.store import is_url

RECIPES = os.path.join(ROOT, "recipes")
PRESET = "configs/train_gpt2.py"
# torchrun's flags as tests/test_restarts.py runs them: plain (--standalone) and elastic (c10d)
TESTED_TORCHRUN_FLAGS = {"--standalone", "--nproc_per_node", "--nnodes", "--max-restarts", "--rdzv-backend",
                         "--rdzv-endpoint", "--rdzv-id"}
# what a CPU can run of the 124M preset, put after it on the command line (the recipe's own settings come later)
SHRINK = [*(a for a in TINY_MODEL if a != "--device=cpu"), "--gradient_accumulation_steps=2", "--max_iters=4",
          "--eval_interval=2", "--eval_iters=2", "--wandb_log=False", "--compile=False"]


def skypilot():
    """(run script, the environment SkyPilot gives it on one node of 2 "GPUs")."""
    with open(os.path.join(RECIPES, "skypilot.yaml")) as f:
        task = yaml.safe_load(f)
    env = {"SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_RANK": "0",
           "SKYPILOT_NUM_GPUS_PER_NODE": "2", "SKYPILOT_TASK_ID": "gpt-train-test",
           **{k: str(v) for k, v in task["envs"].items() if v is not None}}
    return task["run"], env


def kubeflow():
    """(command, the PET_* environment the torch-distributed runtime sets for one node of 2)."""
    with open(os.path.join(RECIPES, "kubeflow_trainjob.yaml")) as f:
        job = yaml.safe_load(f)
    assert job["kind"] == "TrainJob" and job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    env = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1",
           "PET_MASTER_PORT": free_port()}
    return shlex.join(job["spec"]["trainer"]["command"]), env


def hf_jobs():
    """(the torchrun line of the job `hf jobs run --dry-run` resolves, no environment), through the real CLI."""
    hf = shutil.which("hf", path=os.path.dirname(sys.executable)) or shutil.which("hf")
    if hf is None:
        pytest.skip("the hf command (huggingface_hub's CLI) is not installed")
    result = subprocess.run(["bash", os.path.join(RECIPES, "hf_jobs.sh"), "me/gpt2", "--dry-run"], cwd=ROOT,
                            env={**os.environ, "PATH": f"{os.path.dirname(hf)}:{os.environ['PATH']}",
                                 "HF_TOKEN": "hf_not_a_token", "WANDB_API_KEY": "not-a-key"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "(dry run) Job not submitted." in result.stdout, result.stdout + result.stderr
    command = re.search(r"^\s*command\s+(.*)$", result.stdout, re.MULTILINE).group(1)
    script = shlex.split(command)[-1]  # bash -c '...'
    return next(part.strip() for part in script.split("&&") if part.strip().startswith("torchrun")), {}


RECIPE_COMMANDS = {"skypilot": skypilot, "kubeflow": kubeflow, "hf_jobs": hf_jobs}


def training_line(script):
    """The torchrun command of a script: its continuation lines joined, the line that starts torchrun."""
    return next(line.strip() for line in script.replace("\\\n", " ").splitlines() if line.strip().startswith("torchrun"))


@pytest.mark.parametrize("recipe", sorted(RECIPE_COMMANDS))
def test_each_recipe_runs_the_tested_command(recipe):
    script, env = RECIPE_COMMANDS[recipe]()
    words = [re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), w) for w in shlex.split(training_line(script))]
    launcher, entry = words[:words.index("train.py")], words[words.index("train.py"):]
    assert launcher[0] == "torchrun"
    assert {flag.split("=")[0] for flag in launcher[1:]} <= TESTED_TORCHRUN_FLAGS, launcher
    assert entry[1] == PRESET and os.path.exists(os.path.join(ROOT, PRESET))
    assert "--resume_from_checkpoint=True" in entry  # every start the engine makes continues the run
    cfg = load_config(entry[1:])  # every setting exists and parses
    assert is_url(cfg.out_dir), cfg.out_dir  # the run outlives the machine


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPE_COMMANDS))
def test_each_recipes_command_trains_two_processes_on_cpu_and_continues_on_the_next_start(recipe, char_data,
                                                                                         tmp_path):
    """The recipe's own command line, as its engine starts it, with only the preset shrunk and
    out_dir on this disk: it trains, and started again (the engine's recovery) it resumes."""
    script, env = RECIPE_COMMANDS[recipe]()
    out_dir = str(tmp_path / "run")
    line = script.replace(PRESET, shlex.join([PRESET, f"--data_dir={char_data}", *SHRINK]))
    line = re.sub(r"--out_dir=\S+", f"--out_dir={out_dir}", line).replace("--nproc_per_node=8", "--nproc_per_node=2")
    line = line.replace(":29500", f":{free_port()}")  # runs of the suite side by side share no rendezvous
    environment = {**os.environ, **env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    first = subprocess.run(["bash", "-c", line], cwd=ROOT, env=environment, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 process(es) on cpu" in first.stdout and "iter 3: loss" in first.stdout, first.stdout
    again = subprocess.run(["bash", "-c", line.replace("--max_iters=4", "--max_iters=6")], cwd=ROOT,
                           env=environment, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from iteration 4" in again.stdout and "iter 5: loss" in again.stdout, again.stdout
