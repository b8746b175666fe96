"""Settings: nanoGPT's names and defaults, preset chaining, TrainingArguments names, clear errors."""
import os

import pytest

from conftest import ROOT, run_script
from gpt_train.cli import load_config
from gpt_train.config import TrainConfig
from gpt_train.errors import UserError

# nanoGPT's train.py defaults, the contract a nanoGPT user counts on.
NANOGPT_DEFAULTS = dict(
    out_dir="out", eval_interval=2000, log_interval=1, eval_iters=200, eval_only=False,
    always_save_checkpoint=True, init_from="scratch", wandb_log=False, wandb_project="owt",
    wandb_run_name="gpt2", dataset="openwebtext", gradient_accumulation_steps=40, batch_size=12,
    block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=False, learning_rate=6e-4,
    max_iters=600000, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, decay_lr=True,
    warmup_iters=2000, lr_decay_iters=600000, min_lr=6e-5, backend="nccl", compile=True, seed=1337)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_nanogpts():
    cfg = load_config([])
    assert {k: getattr(cfg, k) for k in NANOGPT_DEFAULTS} == NANOGPT_DEFAULTS


def test_presets_chain_in_order_and_command_line_wins(tmp_path):
    first = write(tmp_path, "a.py", "batch_size = 8\nn_layer = 3\nout_dir = 'first'\n")
    second = write(tmp_path, "b.py", "n_layer = 5\n")
    cfg = load_config([first, second, "--out_dir=cli", "--dropout=0.1"])
    assert (cfg.batch_size, cfg.n_layer, cfg.out_dir, cfg.dropout) == (8, 5, "cli", 0.1)


def test_nanogpt_preset_with_imports_runs_unchanged():
    # configs/finetune_shakespeare.py is nanoGPT's file verbatim: it imports time and computes a name.
    cfg = load_config([os.path.join(ROOT, "configs", "finetune_shakespeare.py")])
    assert cfg.init_from == "gpt2-xl" and cfg.gradient_accumulation_steps == 32 and cfg.batch_size == 1
    assert cfg.wandb_run_name.startswith("ft-") and cfg.decay_lr is False and cfg.learning_rate == 3e-5


@pytest.mark.parametrize("raw, expected", [("True", True), ("False", False), ("true", True), ("false", False)])
def test_booleans_accept_true_and_false(raw, expected):
    assert load_config([f"--compile={raw}"]).compile is expected


def test_ints_widen_to_floats_and_words_are_strings():
    cfg = load_config(["--learning_rate=1", "--init_from=gpt2-medium", "--wandb_run_name=2024"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.init_from == "gpt2-medium" and cfg.wandb_run_name == "2024"


def test_training_arguments_names_set_our_fields(tmp_path):
    preset = write(tmp_path, "hf.py", "per_device_train_batch_size = 6\nmax_steps = 99\nreport_to = 'wandb'\n")
    cfg = load_config([preset, "--warmup_steps=7", "--max_grad_norm=0.5", "--bf16=True", "--output_dir=o",
                       "--adam_beta2=0.9", "--eval_steps=3", "--logging_steps=2", "--torch_compile=False"])
    assert (cfg.batch_size, cfg.max_iters, cfg.wandb_log, cfg.warmup_iters) == (6, 99, True, 7)
    assert (cfg.grad_clip, cfg.dtype, cfg.out_dir, cfg.beta2) == (0.5, "bfloat16", "o", 0.9)
    assert (cfg.eval_interval, cfg.log_interval, cfg.compile) == (3, 2, False)


def test_later_layer_may_use_the_other_spelling(tmp_path):
    preset = write(tmp_path, "p.py", "batch_size = 4\n")
    assert load_config([preset, "--per_device_train_batch_size=9"]).batch_size == 9


@pytest.mark.parametrize("argv, message", [
    (["--batch_size=4", "--per_device_train_batch_size=4"], "sets batch_size twice"),
    (["--bf16=True", "--dtype=float32"], "sets dtype twice"),
    (["--batch_sise=4"], "did you mean batch_size"),
    (["--max_step=4"], "did you mean max_steps"),
    (["--batch_size=abc"], "batch_size must be int"),
    (["--batch_size=1.5"], "batch_size must be int"),
    (["--compile=yes"], "compile must be bool"),
    (["--batch_size"], "has no value"),
    (["batch_size=3"], "looks like a setting"),
    (["--n_embd=100", "--n_head=3"], "divisible by n_head"),
    (["--batch_size=0"], "batch_size must be at least 1"),
    (["--block_size=0"], "block_size must be at least 1"),
    (["--max_iters=0"], "max_iters must be at least 1"),
    (["--eval_interval=-1"], "eval_interval must be at least 1"),
    (["--eval_iters=0"], "eval_iters must be at least 1"),
    (["--gradient_accumulation_steps=0"], "gradient_accumulation_steps must be at least 1"),
    (["--learning_rate=-0.1"], "learning_rate must not be negative"),
    (["--min_lr=0.1", "--learning_rate=0.01"], "min_lr (0.1) is above learning_rate"),
    (["--dtype=float64"], "dtype must be one of"),
    (["--report_to=tensorbord"], "not a tracker gpt-train reports to"),
    (["no_such_preset.py"], "preset file no_such_preset.py not found"),
])
def test_bad_settings_are_named_in_the_error(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(argv)


def test_preset_syntax_error_names_file_and_line(tmp_path):
    preset = write(tmp_path, "broken.py", "batch_size = 4\nn_layer = = 2\n")
    with pytest.raises(UserError, match=r"broken.py, line 2"):
        load_config([preset])


def test_preset_may_not_set_unknown_names(tmp_path):
    preset = write(tmp_path, "typo.py", "learning_rat = 1e-3\n")
    with pytest.raises(UserError, match="unknown setting 'learning_rat' in .*typo.py; did you mean learning_rate"):
        load_config([preset])


@pytest.mark.parametrize("args, message", [
    (["--n_layr=2"], "error: unknown setting 'n_layr' in the command line; did you mean n_layer?"),
    (["configs/does_not_exist.py"], "error: preset file configs/does_not_exist.py not found"),
])
@pytest.mark.slow
def test_train_cli_reports_one_line_and_exits_nonzero(args, message):
    result = run_script("train.py", *args, check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == message
    assert "Traceback" not in result.stdout + result.stderr


def test_default_dataclass_has_help_for_every_setting():
    from dataclasses import fields
    assert all(f.metadata.get("help") for f in fields(TrainConfig))


def test_loader_records_which_settings_were_given(tmp_path):
    # A loaded checkpoint's shape overrides defaults but must not silently override a choice.
    preset = write(tmp_path, "p.py", "n_layer = 12\n")
    cfg = load_config([preset, "--per_device_train_batch_size=3"])
    assert cfg.explicit == {"n_layer", "batch_size"}
    assert load_config([]).explicit == frozenset()


def test_every_optimizer_setting_has_its_facts_in_optims_table():
    # the settings list the names (for --help and the check), optim.OPTIMIZERS what each one is
    from gpt_train.config import OPTIMIZERS as NAMES
    from gpt_train.optim import OPTIMIZERS

    assert tuple(OPTIMIZERS) == NAMES
    assert all(callable(facts.build) and facts.state_bytes > 0 for facts in OPTIMIZERS.values())
