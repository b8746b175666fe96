"""The command line as a user meets it: --help, --print_config, console entry points."""
import dataclasses
import importlib
import tomllib

import pytest

from conftest import ROOT, run_script
from gpt_train.cli import groups, load_config
from gpt_train.config import TrainConfig
from gpt_train.prepare import ShakespeareCharConfig


def test_help_lists_every_setting_with_default_type_and_meaning_in_groups(capsys):
    with pytest.raises(SystemExit) as stop:
        load_config(["configs/does_not_matter.py", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        line = next(l for l in text.splitlines() if l.strip().startswith(f"--{f.name}="))
        type_name = getattr(f.type, "__name__", str(f.type))  # resume_from_checkpoint: "bool | str"
        assert f"--{f.name}={f.default!r}" in line and type_name in line and f.metadata["help"] in line
    headers = [l[:-1] for l in text.splitlines() if l.endswith(":") and not l.startswith(" ")]
    assert headers[:7] == ["I/O and logging", "data and batching", "model", "training",
                           "learning-rate schedule", "initialisation", "system"]
    assert text.index("--out_dir=") < text.index("--dataset=") < text.index("--n_layer=") < text.index("--compile=")
    assert "--batch_size=12" in text and "(also per_device_train_batch_size)" in text


def test_every_field_is_in_one_help_group():
    by_group = dict(groups(TrainConfig))
    assert [f.name for f in by_group["model"]] == ["n_layer", "n_head", "n_embd", "dropout", "bias",
                                                   "gradient_checkpointing"]
    assert sum(len(g) for g in by_group.values()) == len(dataclasses.fields(TrainConfig))


def test_help_works_for_any_settings_dataclass(capsys):
    with pytest.raises(SystemExit):
        load_config(["-h"], ShakespeareCharConfig)
    text = capsys.readouterr().out
    assert "--val_fraction=0.1" in text and "share held out for validation" in text


@pytest.mark.slow
def test_print_config_shows_the_resolved_settings_as_a_preset_and_exits(tmp_path):
    # No dataset exists for this preset here: --print_config must not need one.
    result = run_script("train.py", "configs/train_shakespeare_char_cpu.py", "--n_layer=3", "--print_config",
                        "--dataset=nowhere")
    assert "n_layer = 3" in result.stdout and "out_dir = 'out-shakespeare-char'" in result.stdout
    saved = tmp_path / "resolved.py"
    saved.write_text(result.stdout)
    expected = load_config(["configs/train_shakespeare_char_cpu.py", "--n_layer=3", "--dataset=nowhere"])
    assert load_config([str(saved)]) == expected


def test_print_config_still_reports_bad_settings(capsys):
    from gpt_train.commands import train as main
    with pytest.raises(SystemExit) as stop:
        main(["--n_layr=2", "--print_config"])
    assert stop.value.code == 2 and "did you mean n_layer?" in capsys.readouterr().err


def test_console_entry_points_name_importable_mains():
    with open(f"{ROOT}/pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    scripts = project["scripts"]
    assert set(scripts) == {"gpt-train", "gpt-sample", "gpt-prepare", "gpt-bench", "gpt-eval"}
    for name in ("gpt-train", "gpt-prepare", "gpt-eval"):  # sample and bench: their own modules' tests
        module, _, function = scripts[name].partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    assert "dependencies" in project["dynamic"]  # the exact pins of requirements.txt


@pytest.mark.slow
def test_gpt_prepare_dispatches_by_dataset_name(char_data, tmp_path, capsys):
    from gpt_train.commands import prepare as main
    main(["shakespeare_char", f"--out_dir={tmp_path}"])
    for split in ("train", "val"):  # what data_prep/shakespeare_char/prepare.py wrote
        assert (tmp_path / f"{split}.bin").read_bytes() == open(f"{char_data}/{split}.bin", "rb").read()
    with pytest.raises(SystemExit) as stop:
        main(["shakespeare_chr"])
    assert stop.value.code == 2 and "did you mean shakespeare_char?" in capsys.readouterr().err
