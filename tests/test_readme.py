"""The README's and docs/'s commands stay true: every script, preset, module and setting they name
exists; and no figure is stated twice with two values.

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


DOCUMENTS = ["README.md", *sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")))]


def documentation():
    texts = {}
    for name in DOCUMENTS:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            texts[name] = f.read()
    return texts


def readme_commands():
    text = "\n".join(documentation().values())
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


# The figures a reader checks first, each by a pattern that finds every statement of it.
FIGURES = {
    "the quick start's val loss at iteration 2000": r"val loss at iter(?:ation)? 2000[^|\n]*\| (?:\*\*)?(\d\.\d+)",
    "the quick start's val loss over its own 500 eval batches": r"(\d\.\d+) over the run's own 500 eval batches",
    "lm-eval's bits per byte on the quick start's model": r"rolling `bits_per_byte` over the first 200[^.]*?is (\d\.\d+)",
    "GPT-2 124M's tokens/s on one H200": r"GPT-2 124M[^\n]*?(\d{3},\d{3}) tokens/s",
    "the OpenWebText preparer against nanoGPT's recipe": r"OpenWebText preparer[^\n]*?\b(\d\.\d+)x faster",
    "the speedrun's share of the recipe's wall time": r"\*\*(0\.\d+)x\*\* the recipe's wall time|speedrun[^|\n]*\| (0\.\d+)x \|",
}


@pytest.mark.parametrize("name", FIGURES)
def test_a_figure_stated_in_several_places_has_one_value(name):
    found = {}
    for document, text in documentation().items():
        for match in re.finditer(FIGURES[name], text):
            found.setdefault(next(g for g in match.groups() if g), []).append(document)
    assert len(found) == 1, f"{name}: {found}"
