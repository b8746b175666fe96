"""The README's commands stay true: every script, preset, module and setting they name exists.

Running them all would take hours (OpenWebText, 8 GPUs); resolving each one's settings through
the same loader the scripts use catches what goes stale: a renamed setting, a moved preset, a
deleted script. What the commands do is tested for real elsewhere, on tiny models and data.
"""
import importlib
import os
import re
import shlex

import pytest

from conftest import ROOT
from gpt_train.bench import BenchConfig
from gpt_train.cli import load_config
from gpt_train.config import TrainConfig
from gpt_train.sample import SampleConfig

SCRIPT_SETTINGS = {"train.py": TrainConfig, "sample.py": SampleConfig, "bench.py": BenchConfig}


def readme_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for command in re.split(r"\s*&&\s*", line):
                words = shlex.split(command)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # leading VAR=value environment settings
                if words and words[0] in ("python", "accelerate"):
                    commands.append(words)
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_it_should():
    scripts = {w for c in COMMANDS for w in c if w.endswith(".py")}
    assert {"train.py", "sample.py", "bench.py", "data_prep/shakespeare_char/prepare.py",
            "configs/train_shakespeare_char_cpu.py"} <= scripts


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w)[:80])
def test_readme_command_names_real_files_and_valid_settings(words):
    if words[0] == "accelerate":  # accelerate launch [--flag value ...] train.py ...
        config = words[words.index("--config_file") + 1] if "--config_file" in words else None
        if config:
            assert os.path.isfile(os.path.join(ROOT, config)), config
        words = ["python", *words[next(i for i, w in enumerate(words) if w.endswith(".py")):]]
    if words[1] == "-c":
        return  # the pipeline one-liner: run for real in tests/test_sample.py
    if words[1] == "-m":
        module = words[2]
        if module.startswith("gpt_train"):
            importlib.import_module(module)
        return
    script, args = words[1], words[2:]
    assert os.path.isfile(os.path.join(ROOT, script)), script
    settings = SCRIPT_SETTINGS.get(script)
    if settings is None:
        return  # data_prep and benchmarks scripts: their existence is what can go stale here
    if ">" in args:
        args = args[:args.index(">")]  # output redirection
    args = [a for a in args if a not in ("--print_config", "--help", "...") and not a.startswith(("<", "["))]
    written_by_readme = {"my_run.py"}  # the README's own --print_config example writes it
    for preset in (a for a in args if not a.startswith("--")):
        assert preset in written_by_readme or os.path.isfile(os.path.join(ROOT, preset)), preset
    presets_present = [a for a in args if a not in written_by_readme]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        load_config(presets_present, settings)
    finally:
        os.chdir(cwd)
