"""What a newcomer stumbled on, trying the README top to bottom: each one now answered, each a test."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, forget_the_run, one_line_error
from gpt_train.commands import train as main
from gpt_train.model import load_pretrained, read_model_config
from gpt_train.commands import prepare as prepare_main
from gpt_train.prepare import prepare_corpus


def test_a_setting_written_argparse_style_says_settings_take_key_value(capsys):
    error = one_line_error(main, ["--max_iters", "200"], capsys)
    assert error == "error: '--max_iters 200': settings take --key=value, without a space: write --max_iters=200"


def test_one_bad_file_among_a_folders_sources_is_named_with_its_cause_before_anything_is_written(tmp_path, capsys):
    sources = tmp_path / "books"
    sources.mkdir()
    (sources / "a.txt").write_text("To be, or not to be: that is the question.\n" * 50, encoding="utf-8")
    (sources / "b.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    out = tmp_path / "data"
    error = one_line_error(prepare_main, ["custom", f"--source={sources}", f"--out_dir={out}"], capsys)
    assert f"{sources / 'b.txt'} is not UTF-8 text (line 1, byte 0xe9)" in error and "iconv" in error
    assert not out.exists()


def test_a_small_corpus_prepares_without_progress_bars(tmp_path, capsys):
    corpus = tmp_path / "book.txt"
    corpus.write_text("Now is the winter of our discontent.\n" * 2000, encoding="utf-8")
    prepare_corpus([f"--source={corpus}", f"--out_dir={tmp_path / 'data'}", "--num_proc=1"])
    printed = capsys.readouterr()
    assert "%|" not in printed.err + printed.out and "train has" in printed.out


def test_the_quick_start_can_be_run_twice(tiny_run, capsys):
    """The README's one-liner trains with --resume_from_checkpoint=True: a second run finds the
    first's checkpoint and continues it (here: nothing left to train) instead of refusing."""
    out_dir, args = tiny_run
    argv = [*args, "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--resume_from_checkpoint=True"]
    main(argv)
    forget_the_run()
    capsys.readouterr()
    main(argv)
    printed = capsys.readouterr().out
    assert "resuming from iteration 4" in printed and os.path.isfile(os.path.join(out_dir, "model.safetensors"))
    forget_the_run()
    assert "holds another training run" in one_line_error(main, argv[:-1], capsys)  # without it: the refusal


def test_the_start_prints_only_the_settings_not_at_their_defaults(tiny_run, capsys):
    _, args = tiny_run
    main([*args, "--max_iters=1", "--eval_interval=1", "--eval_iters=1"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("settings"))
    assert "training_config.json" in line and "n_layer=2" in line and "beta1=" not in line and len(line) < 700


def test_loading_a_model_folder_shows_no_weight_loading_bar(tiny_gpt2, capsys):
    load_pretrained(tiny_gpt2, read_model_config(tiny_gpt2, tiny_gpt2))
    printed = capsys.readouterr()
    assert "Loading weights" not in printed.err + printed.out


@pytest.mark.slow
def test_gpt_eval_answers_help_and_a_wrong_folder_before_importing_torch_or_lm_eval(tmp_path):
    code = ("import sys\nfrom gpt_train.evaluate import main\n"
            "for argv in (['--help'], [sys.argv[1], '--tasks=x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'lm_eval', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip().endswith("[]"), result.stdout + result.stderr
    assert f"error: {tmp_path} is not a model folder" in result.stderr
