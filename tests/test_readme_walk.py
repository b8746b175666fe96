"""The README's commands, run as a new user runs them: in a fresh copy of the repository, in the
README's order, exactly as written, with settings appended only to make training runs short. The
commands on your own data (my_corpus.txt) share no file with the others and run beside them.

Every command in the sections a newcomer follows (the quick start, usage patterns, scaling out,
installing the commands) is listed in PLAN with what it needs here: the settings appended, or why
it cannot run on a CPU machine without network. A command added to those sections and not to
PLAN fails the test, so the README cannot grow commands nobody ran.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib

import pytest

from conftest import ACCELERATE, ROOT, free_port
from gpt_train.checkpoint import RUN_CONFIG

pytestmark = pytest.mark.slow  # launched processes or lm-eval's task index: the full suite only

SECTIONS = ("Quick start", "Usage patterns", "Scaling out with accelerate launch", "Installing the commands")
SHORT_TRAINING = ["--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10", "--eval_iters=2"]
SHORT_SAMPLING = ["--max_new_tokens=20"]
NO_COMPILE = ["--compile=False"]  # the GPU presets compile; on a CPU that costs ~30 s a run


class Skip(str):
    """Why a command does not run here."""


PLAN = {
    "pip install -r requirements.txt": Skip("installs the environment these tests run in"),
    "python data_prep/shakespeare_char/prepare.py": [],
    "python train.py configs/train_shakespeare_char_cpu.py": SHORT_TRAINING,
    "python sample.py --out_dir=out-shakespeare-char": SHORT_SAMPLING,
    "pip install -r requirements-dev.txt": Skip("installs the environment these tests run in"),
    "python -m pytest -q": Skip("this test suite"),
    "python sample.py --out_dir=out-shakespeare-char --num_samples=3 --max_new_tokens=200": [],
    "python data_prep/openwebtext/prepare.py --num_proc=16": Skip("downloads OpenWebText (54 GB)"),
    "accelerate launch --config_file accelerate_configs/8xa100.yaml train.py configs/train_gpt2.py "
    "--wandb_run_name=gpt2-124M-short --max_iters=100000 --lr_decay_iters=100000": Skip("needs 8 GPUs"),
    "python data_prep/custom/prepare.py --source=my_corpus.txt --name=mine": [],
    "python train.py configs/finetune_shakespeare.py --dataset=mine --init_from=gpt2 --out_dir=out-mine":
        ["--max_iters=2", "--gradient_accumulation_steps=2", "--eval_iters=2", *NO_COMPILE],
    'python sample.py --out_dir=out-mine --start="Once upon a time"': SHORT_SAMPLING,
    "python train.py configs/eval_gpt2.py": ["--eval_iters=2", *NO_COMPILE],
    "accelerate launch --config_file accelerate_configs/8xa100.yaml train.py configs/eval_gpt2_xl.py":
        Skip("needs 8 GPUs"),
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train.py "
    "configs/train_shakespeare_char_cpu.py --gradient_accumulation_steps=2 --batch_size=6 --out_dir=out-ddp":
        SHORT_TRAINING,
    "accelerate launch --config_file accelerate_configs/8xa100.yaml train.py configs/train_gpt2.py":
        Skip("needs 8 GPUs"),
    "accelerate launch --config_file accelerate_configs/2x8xa100.yaml --machine_rank 0 --main_process_ip 10.0.0.1 "
    "train.py configs/train_gpt2.py --gradient_accumulation_steps=32 --batch_size=15": Skip("needs two 8-GPU nodes"),
    "accelerate launch --config_file accelerate_configs/8xa100.yaml --max_restarts=3 train.py configs/train_gpt2.py":
        Skip("needs 8 GPUs (tests/test_restarts.py runs the restart on two CPU processes)"),
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 accelerate launch --config_file accelerate_configs/2x8xa100.yaml "
    "--main_process_ip 10.0.0.1 --rdzv_backend c10d --max_restarts=3 train.py configs/train_gpt2.py "
    "--gradient_accumulation_steps=32 --batch_size=15": Skip("needs two 8-GPU nodes"),
    "pip install -e .": Skip("console commands are run through their pyproject.toml entry points instead"),
    "gpt-prepare shakespeare_char": [],
    "gpt-train configs/train_shakespeare_char_cpu.py --overwrite_output_dir=True": SHORT_TRAINING,
    "gpt-sample --out_dir=out-shakespeare-char": SHORT_SAMPLING,
    "gpt-bench configs/train_shakespeare_char_cpu.py --bench_iters=20": ["--bench_warmup=2"],
}


def readme_section_commands():
    """Each shell command of the SECTIONS' code blocks, in README order ('\\' continuations joined)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        if not section.startswith(SECTIONS):
            continue
        for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    commands += [" ".join(c.split()) for c in re.split(r"\s*&&\s*", line)]
    return commands


def test_every_readme_command_of_the_walk_is_planned():
    commands = readme_section_commands()
    assert set(commands) == set(PLAN), (set(commands) ^ set(PLAN))


@pytest.fixture
def fresh_clone(tmp_path, tiny_gpt2):
    """The repository's files in a new folder, as `git clone` gives them (new files not yet ignored
    count as committed), plus what the README expects the user to bring: my_corpus.txt, and (no
    network here) gpt2 in the HF cache."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "gpt-train"
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(clone / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), clone / name)
    with open(clone / "data_prep" / "tinyshakespeare" / "input.txt", encoding="utf-8") as f:
        (clone / "my_corpus.txt").write_text(f.read()[:200_000])
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2"
    shutil.copytree(tiny_gpt2, snapshot / "snapshots" / "0123abc")
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("0123abc")
    return clone


def console_script(name):
    """What pip's generated `name` script runs: the pyproject.toml entry point, its value to sys.exit."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        module, _, function = tomllib.load(f)["project"]["scripts"][name].partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function} as main; sys.exit(main())"]


def run(command, clone, env):
    words = shlex.split(command) + PLAN[command]
    extra_env = {}
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        extra_env[key] = value
    if words[0] == "python":
        words[0] = sys.executable
    elif words[0] == "accelerate":
        words[0:2] = [ACCELERATE, "launch", "--main_process_port", free_port()]
    elif words[0].startswith("gpt-"):
        words[0:1] = console_script(words[0])
    return subprocess.run(words, cwd=clone, env={**env, **extra_env}, capture_output=True, text=True, timeout=600)


def own_data(command):
    """Whether a command belongs to the "your own data" chain: it shares no file with the others."""
    return "mine" in command or "my_corpus" in command or "eval_gpt2.py" in command


def test_the_readme_walk(fresh_clone, tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
           "OMP_NUM_THREADS": "1"}
    commands = list(dict.fromkeys(c for c in readme_section_commands() if not isinstance(PLAN[c], Skip)))
    # the CPU laptop pattern repeats the quick start's commands: they run once. The two chains
    # share no file, so they run side by side (one thread each, on the 2-core machine), each in
    # README order.
    failures = []
    beside = threading.Thread(target=walk, args=([c for c in commands if own_data(c)], fresh_clone, env, failures))
    beside.start()
    walk([c for c in commands if not own_data(c)], fresh_clone, env, failures)
    beside.join()
    assert not failures, failures[0]


def walk(commands, clone, env, failures):
    try:
        for command in commands:
            if command == "python train.py configs/eval_gpt2.py":
                # its data is OpenWebText (54 GB): a stand-in encoded the same way, with GPT-2 BPE (the walk's own)
                shutil.copytree(clone / "data" / "mine", clone / "data" / "openwebtext")
            result = run(command, clone, env)
            assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stdout,
                                                                                 result.stderr)
            check_output(command, result, clone)
    except AssertionError as e:
        failures.append(e)


def check_output(command, result, clone):
    """What each command must have done, beyond exiting 0 without a traceback."""
    if command.startswith(("python train.py configs/train_shakespeare_char_cpu.py", "gpt-train")):
        assert "best val loss" in result.stdout and (clone / "out-shakespeare-char" / "model.safetensors").is_file()
        assert "Run(" not in result.stdout  # a console script printed the returned run
    if "sample" in command:
        assert len(result.stdout.strip()) > 20, result.stdout
    if "--num_processes 2" in command:  # one run on two processes, not two runs side by side
        assert result.stdout.count("2 process(es) on cpu") == 1 and "1 process(es)" not in result.stdout
        assert result.stdout.count("best val loss") == 1
    if command == "python train.py configs/eval_gpt2.py":
        assert "perplexity: train" in result.stdout
        # the preset's lm-eval tasks: Hub datasets, not cached on this offline machine
        assert "warning: lm-eval on " in result.stderr and "could not load a task's data" in result.stderr
        assert not (clone / "out").exists()  # an evaluation writes nothing
    if command.startswith("gpt-bench"):
        assert "ms/iter (median of 20)" in result.stdout
    if command.startswith("gpt-train"):  # the re-run replaced the quick start's run: its log is one run's
        with open(clone / "out-shakespeare-char" / "metrics.jsonl", encoding="utf-8") as f:
            evals = [line for line in f if '"event": "eval"' in line]
        assert len(evals) == 3  # iterations 0, 10, 20: nothing of the earlier run left in it
        assert (clone / "out-shakespeare-char" / RUN_CONFIG).is_file()
