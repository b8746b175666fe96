"""A model folder with a damaged file (weights cut short or overwritten, a tokenizer or config
file that is not what its name says) gets one line naming the file and what to do from every
command that reads model folders: sample.py, convert's to-nanogpt and upgrade, and gpt-eval.
Exit code 2, no traceback, no file changed.

In-process through each module's main(); one case per command as a user runs it, in a fresh
interpreter (start-up costs seconds there).
"""
import json
import os
import random
import shutil

import pytest

from conftest import one_line_error, tree_digest
from gpt_train.convert import main as convert_main
from gpt_train.evaluate import main as evaluate_main
from gpt_train.sample import main as sample_main

ADVICE = "restore the folder from a copy"


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    """A finished tiny run's out_dir: a model folder with a char tokenizer, copied by each test."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A local lm-eval perplexity task: gpt-eval needs no network to get to the model folder."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "docs.jsonl").write_text(json.dumps({"text": "ROMEO: what news, my lord?\n" * 3}) + "\n")
    (folder / "ppl.yaml").write_text(
        f"task: damaged_ppl\ndataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'docs.jsonl'}\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")
    return str(folder)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def cut_to(size):
    def cut(path):
        with open(path, "r+b") as f:
            f.truncate(size)
    return cut


def cut_in_half(path):
    cut_to(os.path.getsize(path) // 2)(path)


def cut_off_the_end(path):
    cut_to(os.path.getsize(path) - 100)(path)  # the header is whole, the last tensor is not


def garbage(path):
    """The same size, random bytes: as if another file's blocks had been written over it."""
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(random.Random(0).randbytes(size))


def replace_with(text):
    def replace(path):
        with open(path, "w") as f:
            f.write(text)
    return replace


def wrong_type(path):
    with open(path) as f:
        config = json.load(f)
    config["n_layer"] = "two"
    with open(path, "w") as f:
        json.dump(config, f)


DAMAGES = {  # name: (the file damaged, how)
    "weights cut to 1000 bytes": ("model.safetensors", cut_to(1000)),
    "weights overwritten": ("model.safetensors", garbage),
    "weights missing their end": ("model.safetensors", cut_off_the_end),
    "tokenizer.json cut in half": ("tokenizer.json", cut_in_half),
    "tokenizer.json not a tokenizer": ("tokenizer.json", replace_with('{"version": "1.0", "vocab": [1, 2]}')),
    "config.json overwritten": ("config.json", garbage),
    "config.json with a wrong value": ("config.json", wrong_type),
    "tokenizer_config.json overwritten": ("tokenizer_config.json", garbage),
    "generation_config.json overwritten": ("generation_config.json", garbage),
    "generation_config.json a list": ("generation_config.json", replace_with("[1, 2]")),
}


def command_argv(command, folder, tasks, ckpt):
    """(the main to call in-process, its argv, the same as a command line)"""
    if command == "sample":
        argv = [f"--out_dir={folder}", "--num_samples=1", "--max_new_tokens=2", "--device=cpu"]
        return sample_main, argv, ["sample.py", *argv]
    if command == "to-nanogpt":
        argv = ["to-nanogpt", folder, ckpt]
        return convert_main, argv, ["-m", "gpt_train.convert", *argv]
    if command == "upgrade":
        argv = ["upgrade", folder]
        return convert_main, argv, ["-m", "gpt_train.convert", *argv]
    pytest.importorskip("lm_eval", reason="pip install -r requirements-eval.txt")
    argv = [folder, "--tasks=damaged_ppl", f"--include_path={tasks}", "--limit=1", "--batch_size=1", "--device=cpu"]
    return evaluate_main, argv, ["-m", "gpt_train.evaluate", *argv]


COMMANDS = ("sample", "to-nanogpt", "upgrade", "evaluate")
# one per entry point (convert's two commands share one): the rest in-process, where start-up costs nothing
IN_A_FRESH_INTERPRETER = {("weights cut to 1000 bytes", "sample"), ("weights overwritten", "to-nanogpt"),
                          ("tokenizer.json not a tokenizer", "evaluate")}


@pytest.mark.parametrize("damage, command", [
    pytest.param(damage, command, marks=pytest.mark.slow) if (damage, command) in IN_A_FRESH_INTERPRETER
    else (damage, command) for damage in DAMAGES for command in COMMANDS])
def test_a_damaged_model_file_gets_one_line_naming_it_and_changes_no_file(damage, command, trained, tasks, tmp_path,
                                                                         capsys):
    name, damage_it = DAMAGES[damage]
    folder, ckpt = str(tmp_path / "model"), str(tmp_path / "nanogpt" / "ckpt.pt")
    shutil.copytree(trained, folder)
    damage_it(os.path.join(folder, name))
    before = tree_digest(folder)
    main, argv, command_line = command_argv(command, folder, tasks, ckpt)
    fresh = command_line if (damage, command) in IN_A_FRESH_INTERPRETER else None
    error = one_line_error(main, argv, capsys, fresh, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert error.startswith(f"error: {os.path.join(folder, name)} is damaged (") and ADVICE in error
    assert tree_digest(folder) == before
    assert not os.path.exists(os.path.dirname(ckpt))
