"""What a new user meets on the README's paths: one run per out_dir, evaluations that write
nothing, resumes that resume the run's settings, tokenizers that must agree, and one line (never a
traceback) for pipes, wandb and failed uploads. The commands themselves run in test_readme_walk.py.
"""
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_MODEL, one_line_error, read_metrics, run_script, tree_digest
from gpt_train.bench import main as bench_main
from gpt_train.cli import load_config
from gpt_train.commands import train as main
from gpt_train.errors import UserError
from gpt_train.commands import prepare as prepare_main
from gpt_train.train import train

SHORT = ["--max_iters=6", "--eval_interval=3", "--eval_iters=2"]


def run(args):
    return train(load_config(args))


def test_a_new_run_into_an_out_dir_holding_a_run_is_refused_and_changes_nothing(tiny_run):
    out_dir, args = tiny_run
    run([*args, *SHORT])
    before = tree_digest(out_dir)
    with pytest.raises(UserError, match=rf"{out_dir} holds another training run \(a checkpoint at iteration 6\): "
                                        "continue it with --init_from=resume, train into another --out_dir, or "
                                        "replace it with --overwrite_output_dir=True"):
        run([*args, *SHORT, "--n_embd=64"])
    assert tree_digest(out_dir) == before


def test_overwrite_output_dir_replaces_the_run_and_never_mixes_two_logs(tiny_run, char_data, tmp_path):
    out_dir, args = tiny_run
    run([*args, *SHORT])
    (tmp_path / "out" / "notes.txt").write_text("mine")
    run([*args, "--max_iters=4", "--eval_interval=2", "--eval_iters=2", "--n_embd=64", "--n_head=2",
         "--overwrite_output_dir=True"])
    assert [e["iter"] for e in read_metrics(out_dir, "eval")] == [0, 2, 4]  # the new run's log alone
    with open(os.path.join(out_dir, "config.json")) as f:
        assert json.load(f)["n_embd"] == 64
    with open(os.path.join(out_dir, "training_state", "trainer_state.json")) as f:
        assert json.load(f)["iter_num"] == 4
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # not gpt-train's to delete


def test_overwrite_output_dir_into_a_new_folder_just_trains(tiny_run):
    out_dir, args = tiny_run
    run([*args, *SHORT, "--overwrite_output_dir=True"])
    assert [e["iter"] for e in read_metrics(out_dir, "eval")] == [0, 3, 6]


def test_eval_only_leaves_the_run_it_evaluates_untouched(tiny_run, capsys):
    out_dir, args = tiny_run
    run([*args, *SHORT])
    before = tree_digest(out_dir)
    capsys.readouterr()
    run([f"--out_dir={out_dir}", "--init_from=resume", "--eval_only=True", "--eval_iters=5"])
    printed = capsys.readouterr().out
    assert "step 6: train loss" in printed and "perplexity: train" in printed
    assert tree_digest(out_dir) == before


def test_eval_only_of_a_model_folder_writes_no_out_dir(tiny_gpt2, bpe_data, tmp_path, capsys):
    run([f"--init_from={tiny_gpt2}", f"--data_dir={bpe_data}", f"--out_dir={tmp_path / 'never'}",
         "--eval_only=True", "--eval_iters=2", "--batch_size=2", "--device=cpu", "--compile=False"])
    assert "perplexity: train" in capsys.readouterr().out
    assert not (tmp_path / "never").exists()


def test_resume_takes_the_runs_settings_and_says_what_the_command_line_changes(tiny_run, capsys):
    out_dir, args = tiny_run
    run([*args, *SHORT, "--learning_rate=2e-3", "--batch_size=3"])
    capsys.readouterr()
    # no preset, no data_dir, no model shape: all of it comes from the run
    resumed = run([f"--out_dir={out_dir}", "--init_from=resume", "--max_iters=9", "--learning_rate=1e-3"])
    printed = capsys.readouterr().out.splitlines()
    cfg = resumed.cfg
    assert (cfg.batch_size, cfg.n_embd, cfg.block_size, cfg.device, cfg.compile) == (3, 32, 32, "cpu", False)
    assert cfg.data_dir == args[0].partition("=")[2] and cfg.max_iters == 9 and cfg.learning_rate == 1e-3
    assert "resume changes learning_rate: 0.002 -> 0.001; the run will not continue exactly as it would have" in printed
    assert "resume changes max_iters: 6 -> 9" in printed
    assert "resuming from iteration 6 (best val" in "\n".join(printed)
    assert [e["iter"] for e in read_metrics(out_dir, "eval")] == [0, 3, 6, 9]  # 6 once: the resume's replaces it


def test_resume_names_a_change_of_tokens_per_iteration(tiny_run, capsys):
    out_dir, args = tiny_run
    run([*args, *SHORT])
    capsys.readouterr()
    run([f"--out_dir={out_dir}", "--init_from=resume", "--max_iters=7", "--gradient_accumulation_steps=2"])
    printed = capsys.readouterr().out
    assert "resume changes gradient_accumulation_steps: 1 -> 2; the run will not continue exactly" in printed
    assert "resume changes the tokens per iteration: 128 -> 256" in printed


def char_dataset(folder, chars):
    """A nanoGPT-style char dataset over `chars` (ids are ranks in the sorted set)."""
    import numpy as np
    os.makedirs(folder)
    stoi = {ch: i for i, ch in enumerate(sorted(chars))}
    ids = np.array([stoi[c] for c in (chars * 200)], dtype=np.uint16)
    for split in ("train", "val"):
        ids.tofile(os.path.join(folder, f"{split}.bin"))
    with open(os.path.join(folder, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(stoi), "stoi": stoi, "itos": {i: c for c, i in stoi.items()}}, f)
    return str(folder)


def test_fine_tuning_on_data_whose_ids_mean_other_characters_is_refused(tiny_run, char_data, tmp_path):
    out_dir, args = tiny_run
    run([*args, *SHORT])
    other = char_dataset(tmp_path / "other", "ABCDEFGHIJ:! \n")
    with pytest.raises(UserError, match=r"was encoded with another tokenizer than .*'s \(id 3 is ':' in the data, "
                                        r"'\$' in the model\): prepare the data with the model's tokenizer"):
        run([f"--init_from={out_dir}", f"--data_dir={other}", f"--out_dir={tmp_path / 'ft'}", *TINY_MODEL[6:]])
    assert not (tmp_path / "ft").exists()


def test_char_data_into_a_gpt2_model_is_refused(tiny_gpt2, char_data, tmp_path):
    with pytest.raises(UserError, match=r"id 0 is '\\n' in the data, '!' in the model\): prepare the data with "
                                        "the model's tokenizer"):
        run([f"--init_from={tiny_gpt2}", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'ft'}", *TINY_MODEL[6:]])


def test_the_same_char_vocabulary_fine_tunes(tiny_run, char_data, tmp_path):
    out_dir, args = tiny_run
    run([*args, *SHORT])
    run([f"--init_from={out_dir}", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'ft'}", *TINY_MODEL[6:],
         "--max_iters=2", "--eval_interval=2", "--eval_iters=1"])
    assert (tmp_path / "ft" / "model.safetensors").is_file()


def test_every_file_of_a_model_folder_is_readable_by_others(tiny_run):
    out_dir, args = tiny_run
    old = os.umask(0o022)
    try:
        run([*args, *SHORT])
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "training_state/trainer_state.json"):
        assert stat.S_IMODE(os.stat(os.path.join(out_dir, name)).st_mode) == 0o644, name


def test_a_cpu_run_reports_no_mfu(tiny_run, capsys):
    """MFU is against a GPU's peak; nanoGPT's A100 yardstick for a CPU would read ~0.01%."""
    out_dir, args = tiny_run
    run([*args, *SHORT])
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith(("iter ", "step ", "throughput"))]
    assert "iter 0: loss" in printed and lines and not [line for line in lines if "mfu" in line.lower()]
    assert not [e for event in ("train", "eval") for e in read_metrics(out_dir, event) if "mfu" in e]


@pytest.mark.slow
def test_help_answers_before_torch_is_imported():
    code = ("import sys\nfrom gpt_train.commands import train\ntry:\n    train(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False False"


@pytest.mark.parametrize("argv, message", [
    (["--eval_only", "--print_config"], "eval_only = True"),
    (["--compile", "--print_config"], "compile = True"),
])
@pytest.mark.slow
def test_a_bare_boolean_flag_is_true(argv, message):
    result = run_script("train.py", *argv)
    assert message in result.stdout.splitlines()


@pytest.mark.parametrize("argv, message", [
    (["--print-config"], "error: unknown setting 'print-config' in the command line; did you mean --print_config?"),
    (["--batch_size"], "error: '--batch_size' has no value: write --batch_size=VALUE"),
])
@pytest.mark.slow
def test_flag_mistakes_get_a_useful_hint(argv, message):
    result = run_script("train.py", *argv, check=False)
    assert result.returncode == 2 and result.stderr.strip() == message


def shell(command, env=None):
    return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})


@pytest.mark.slow
def test_training_piped_into_head_trains_on_quietly(char_data, tmp_path):
    out_dir = tmp_path / "piped"
    args = " ".join([f"--data_dir={char_data}", f"--out_dir={out_dir}", *TINY_MODEL, "--max_iters=40",
                     "--eval_interval=20", "--eval_iters=2"])
    result = shell(f"set -o pipefail; {sys.executable} train.py {args} | head -2")
    assert result.returncode == 0 and "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    with open(out_dir / "training_state" / "trainer_state.json") as f:
        assert json.load(f)["iter_num"] == 40  # the run finished: its last checkpoint is whole


@pytest.mark.slow
def test_sampling_and_help_piped_into_head_stop_quietly(tiny_run):
    out_dir, args = tiny_run
    run([*args, *SHORT])
    result = shell(f"{sys.executable} sample.py --out_dir={out_dir} --num_samples=20 --max_new_tokens=2000 "
                   "--device=cpu | head -1")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    result = shell(f"{sys.executable} train.py --help | head -1")
    assert "Traceback" not in result.stderr and result.stdout.startswith("usage:")


def test_wandb_without_a_key_stops_before_anything_is_written(tiny_run, tmp_path, monkeypatch, capsys):
    out_dir, args = tiny_run
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "NETRC": str(tmp_path / "no-netrc"),
                        "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    assert one_line_error(main, [*args, *SHORT, "--wandb_log=True"], capsys) == (
        "error: wandb_log=True needs a W&B API key: run `wandb login` or set WANDB_API_KEY, or log locally with "
        "WANDB_MODE=offline and upload later with `wandb sync`")
    assert not os.path.exists(out_dir)


@pytest.mark.slow
def test_wandb_that_cannot_reach_its_server_is_one_line_and_writes_nothing(tiny_run, tmp_path):
    out_dir, args = tiny_run
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_INIT_TIMEOUT": "1", "WANDB_X_GRAPHQL_RETRY_MAX": "1", "WANDB_X_GRAPHQL_TIMEOUT_SECONDS": "1",
           "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "HOME": str(tmp_path)}
    result = run_script("train.py", *args, *SHORT, "--wandb_log=True", check=False, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: wandb could not start the run (") and last.endswith(
        "check the network and key, or log locally with WANDB_MODE=offline and upload later with `wandb sync`")
    assert not os.path.exists(os.path.join(out_dir, "training_config.json"))


def test_an_unprepared_default_dataset_names_the_small_presets(tmp_path, capsys):
    error = one_line_error(bench_main, [f"--data_dir={tmp_path / 'missing'}"], capsys)  # bench.py's main
    assert error.endswith("(a 54 GB download; to try gpt-train on a laptop instead: python "
                          "data_prep/shakespeare_char/prepare.py, then pass configs/train_shakespeare_char_cpu.py)")


def test_an_empty_text_file_is_refused_and_writes_no_dataset(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    # data_prep/custom/prepare.py's main
    argv = ["custom", f"--source={tmp_path / 'empty.txt'}", f"--out_dir={tmp_path / 'ds'}"]
    error = one_line_error(prepare_main, argv, capsys)
    assert error.startswith("error: the train split holds no text")
    assert not (tmp_path / "ds" / "train.bin").exists()


@pytest.mark.slow
def test_the_cpu_recipe_benchmark_runs_from_the_repository_alone(char_data):
    result = run_script("benchmarks/cpu_recipe.py", "--iters=52", f"--data={char_data}")
    assert "ratio gpt-train/reference:" in result.stdout


@pytest.mark.slow
def test_the_prepare_benchmarks_gpt_train_side_runs(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "Some words to encode."}\n' * 50)
    result = run_script("benchmarks/prepare_throughput.py", "--child=gpt-train", f"--corpus={corpus}",
                        f"--out={tmp_path / 'out'}", "--num_proc=1")
    assert float(result.stdout.strip().splitlines()[-1]) > 0  # the seconds it took
    assert (tmp_path / "out" / "train.bin").is_file()


def test_tool_outputs_in_the_repository_root_are_ignored_by_git():
    for name in ("bench_trace.json", "loss_comparison.png"):
        assert subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT).returncode == 0, name


def test_the_cpu_preset_logs_to_its_own_wandb_project():
    cfg = load_config([os.path.join(ROOT, "configs", "train_shakespeare_char_cpu.py")])
    assert cfg.wandb_project == "shakespeare-char" and cfg.wandb_log is False


@pytest.mark.slow
def test_ctrl_c_during_an_evaluation_is_acknowledged_at_once(char_data, tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}",
                             *TINY_MODEL, "--eval_iters=5000", "--max_iters=5", "--eval_interval=5"],
                            cwd=ROOT, text=True, bufsize=1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("number of parameters"):
            break
    time.sleep(1.0)  # inside the first evaluation: 2 x 5000 batches take several seconds
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:
        lines.append(line)
        if "received" in line:
            break
    proc.send_signal(signal.SIGINT)  # the second Ctrl-C stops at once
    proc.communicate(timeout=120)
    assert lines[-1].startswith("SIGINT received: saving a checkpoint at the next step boundary, then stopping")
    assert not any(line.startswith("step 0:") for line in lines)  # said before the evaluation ended
