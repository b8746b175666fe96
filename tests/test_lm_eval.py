"""Model folders judged by EleutherAI's lm-evaluation-harness (requirements-eval.txt), as a user
of it would: HFLM on the folder, local tasks of each request type lm-eval has."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from huggingface_hub import ModelCard

from conftest import ROOT, TINY_MODEL, copy_of, read_metrics, sha256
from gpt_train import checkpoint
from gpt_train.commands import train as main
from gpt_train import evaluate as evaluate_module
from gpt_train.evaluate import main as evaluate_main

lm_eval = pytest.importorskip("lm_eval", reason="pip install -r requirements-eval.txt")  # requirements-dev has it
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

pytestmark = pytest.mark.slow  # launched processes or lm-eval's task index: the full suite only

MAX_GEN_TOKS = 10  # far below half the context: the length at which the old folders overflowed
TASK_FOLDER = []  # where the tasks fixture wrote its YAML files


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A rolling-perplexity, a multiple-choice and a long-context generation task on local files."""
    folder = tmp_path_factory.mktemp("tasks")
    with open(os.path.join(os.path.dirname(__file__), "..", "data_prep", "tinyshakespeare", "input.txt")) as f:
        paragraphs = [p for p in f.read().split("\n\n") if len(p) > 200][:6]  # each longer than the context
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    (folder / "mc.jsonl").write_text("".join(
        json.dumps({"context": p[:40], "choices": [p[40:60], p[::-1][:20]], "label": 0}) + "\n" for p in paragraphs))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "ppl.yaml").write_text(
        f"task: shakespeare_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    (folder / "mc.yaml").write_text(
        f"task: shakespeare_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        f"task: shakespeare_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{text}}'\ndoc_to_target: 'x'\n"
        f"generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "gen_default.yaml").write_text(  # lm-eval's default max_gen_toks (256): 8x the tiny context
        f"task: shakespeare_gen_default\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{text}}'\ndoc_to_target: 'x'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    TASK_FOLDER[:] = [str(folder)]
    return TaskManager(include_path=str(folder))


def trained(data_dir, out_dir):
    main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL, "--max_iters=4", "--eval_interval=4",
          "--eval_iters=1"])
    return out_dir


@pytest.fixture(scope="module")
def bpe_folder(bpe_data, tmp_path_factory):
    return trained(bpe_data, str(tmp_path_factory.mktemp("bpe") / "out"))


@pytest.fixture(scope="module")
def char_folder(tiny_checkpoint, tmp_path_factory):
    return copy_of(tiny_checkpoint, tmp_path_factory, "char")  # lm-eval writes its results into it


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def evaluate(folder, task_names, task_manager, **model_args):
    lm = HFLM(pretrained=folder, batch_size=2, device="cpu", **model_args)
    return lm_eval.simple_evaluate(model=lm, tasks=task_names, task_manager=task_manager, log_samples=False,
                                   verbosity="ERROR")["results"]


def test_lm_eval_scores_and_generates_past_half_the_context_on_a_bpe_folder(bpe_folder, tasks):
    results = evaluate(bpe_folder, ["shakespeare_ppl", "shakespeare_mc", "shakespeare_gen"], tasks)
    assert 0 < results["shakespeare_ppl"]["bits_per_byte,none"] < 20
    assert 0 <= results["shakespeare_mc"]["acc,none"] <= 1
    assert results["shakespeare_gen"]["exact_match,none"] == 0.0  # ran: contexts cut to fit, no IndexError


def test_lm_eval_scores_a_char_folder_with_a_newline_prefix(char_folder, tasks):
    """A char vocabulary has no BOS/EOS: lm-eval's prefix_token_id names what starts a text."""
    results = evaluate(char_folder, ["shakespeare_ppl", "shakespeare_mc"], tasks, prefix_token_id=0)  # 0 is "\n"
    assert 0 < results["shakespeare_ppl"]["bits_per_byte,none"] < 10
    assert 0 <= results["shakespeare_mc"]["acc,none"] <= 1


def test_gpt_train_evaluate_prints_the_table_and_writes_results_beside_the_model(bpe_folder, tasks, tmp_path, capsys):
    folder = str(tmp_path / "judged")
    shutil.copytree(bpe_folder, folder)
    weights = sha256(os.path.join(folder, "model.safetensors"))
    judge(["shakespeare_ppl", "shakespeare_mc"], folder, tasks)
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|shakespeare_mc")]  # lm-eval's table
    assert len(table) == 1 and "|acc" in table[0].replace(" ", "") and f"wrote {folder}/eval_results.json" in out
    with open(os.path.join(folder, "eval_results.json")) as f:
        saved = json.load(f)
    assert saved["iteration"] == 4 and set(saved["results"]) == {"shakespeare_ppl", "shakespeare_mc"}
    assert 0 <= saved["results"]["shakespeare_mc"]["acc"] <= 1
    card = ModelCard.load(os.path.join(folder, "README.md"))
    index = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert index[("shakespeare_mc", "acc")] == saved["results"]["shakespeare_mc"]["acc"]
    assert "model-index" in card.content and "| tokens seen |" in card.content  # the rest of the card stays
    assert checkpoint.read_trainer_state(folder).iter_num == 4  # card and manifest changed together
    assert sha256(os.path.join(folder, "model.safetensors")) == weights


def test_a_generation_task_asking_more_tokens_than_the_context_is_capped_in_one_line(bpe_folder, tasks, tmp_path,
                                                                                    capsys):
    """lm-eval asserted (a traceback) where the context (32 here) is not above max_gen_toks (256 by default)."""
    folder = str(tmp_path / "judged")
    shutil.copytree(bpe_folder, folder)
    judge(["shakespeare_gen_default", "shakespeare_gen"], folder, tasks)
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert notes == ["note: shakespeare_gen_default would generate up to 256 tokens, past the model's context of 32: "
                     "max_gen_toks=16 there (half the context; the prompt keeps the rest)"]
    assert "|shakespeare_gen_default" in out and "|shakespeare_gen " in out  # the other task kept its 10 tokens
    with open(os.path.join(folder, "eval_results.json")) as f:
        generation = {task: entry["generation"] for task, entry in json.load(f)["tasks"].items()}
    assert generation["shakespeare_gen_default"]["max_gen_toks"] == 16  # the cap, recorded with the scores
    assert generation["shakespeare_gen"]["max_gen_toks"] == 10  # the task's own

    judge(["shakespeare_gen"], folder, tasks, "--gen_kwargs=temperature=0,max_gen_toks=40")  # lm-eval's syntax
    out = capsys.readouterr().out
    assert "note: shakespeare_gen would generate up to 40 tokens, past the model's context of 32: max_gen_toks=16" in out
    with open(os.path.join(folder, "eval_results.json")) as f:
        saved = json.load(f)["tasks"]
    assert saved["shakespeare_gen"]["generation"].items() >= {"temperature": 0, "max_gen_toks": 16}.items()
    assert saved["shakespeare_gen_default"]["generation"]["max_gen_toks"] == 16  # the earlier evaluation's, kept
    judge(["shakespeare_gen"], folder, tasks, "--gen_kwargs=max_gen_toks=4")
    assert "note:" not in capsys.readouterr().out
    with open(os.path.join(folder, "eval_results.json")) as f:
        assert json.load(f)["tasks"]["shakespeare_gen"]["generation"]["max_gen_toks"] == 4
    assert one_line(["shakespeare_gen"], folder, tasks, capsys, "--gen_kwargs=temperature").startswith(
        "error: --gen_kwargs=temperature: ")
    assert one_line(["shakespeare_gen"], folder, tasks, capsys, "--gen_kwargs=max_gen_toks=abc") == (
        "error: --gen_kwargs=max_gen_toks=abc: max_gen_toks must be a whole number >= 0, got 'abc'\n")


def test_a_smaller_evaluation_never_erases_a_larger_one_and_other_tasks_add_up(bpe_folder, tasks, tmp_path, capsys):
    folder = str(tmp_path / "judged")
    shutil.copytree(bpe_folder, folder)
    judge(["shakespeare_ppl"], folder, tasks)  # the whole benchmark
    with open(os.path.join(folder, "eval_results.json")) as f:
        full = json.load(f)["results"]["shakespeare_ppl"]
    judge(["shakespeare_ppl", "shakespeare_mc"], folder, tasks, "--limit=2")
    assert "note: shakespeare_ppl's scores on the whole benchmark stay in eval_results.json" in capsys.readouterr().out
    with open(os.path.join(folder, "eval_results.json")) as f:
        saved = json.load(f)
    assert saved["results"]["shakespeare_ppl"] == full and saved["tasks"]["shakespeare_ppl"]["limit"] is None
    assert saved["tasks"]["shakespeare_mc"]["limit"] == 2  # a task only scored in part is kept, marked as such
    card = ModelCard.load(os.path.join(folder, "README.md"))
    sources = {r.dataset_name: r.source_name for r in card.data.eval_results}
    assert sources == {"shakespeare_ppl": None, "shakespeare_mc": "lm-eval on the first 2 examples"}
    index = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert index[("shakespeare_ppl", "bits_per_byte")] == full["bits_per_byte"]


def test_gpt_train_evaluate_starts_a_char_model_after_a_newline_and_refuses_its_generation(char_folder, tasks,
                                                                                          capsys):
    judge(["shakespeare_ppl"], char_folder, tasks)
    assert "shakespeare_ppl" in capsys.readouterr().out
    assert one_line(["shakespeare_gen"], char_folder, tasks, capsys).startswith(
        "error: shakespeare_gen is a generation task, and ")


def test_a_task_whose_data_is_neither_cached_nor_reachable_fails_in_seconds_in_one_line(bpe_folder, tmp_path,
                                                                                       capsys):
    """In a fresh interpreter with the Hub unreachable, not offline by setting: the command finds out itself."""
    (tmp_path / "hub.yaml").write_text(
        "task: hub_only\ndataset_path: gpt-train-tests/not-cached\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gpt_train.evaluate", bpe_folder, "--tasks=hub_only",
                             f"--include_path={tmp_path}", "--device=cpu"], cwd=ROOT, capture_output=True, text=True,
                            env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=300)
    took = time.monotonic() - started
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and errors[0].startswith("error: lm-eval could not load a task's data (")
    assert took < 60, f"{took:.0f} s"  # imports included; datasets' retries alone took minutes
    assert one_line(["no_such_task"], bpe_folder, str(tmp_path), capsys).startswith(
        "error: unknown lm-eval task 'no_such_task'")


def test_an_unreachable_hub_makes_datasets_read_its_cache_for_the_evaluation_alone(monkeypatch):
    """The Hub pusher uploads on its own thread during an evaluation: the Hub client never goes offline."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")  # the module's fixture set it; importing read it before
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with evaluate_module._offline_unless_the_hub_answers():
        assert datasets.config.HF_HUB_OFFLINE and not constants.is_offline_mode()
    assert not datasets.config.HF_HUB_OFFLINE


def judge(task_names, folder, tasks, *options):
    include = tasks if isinstance(tasks, str) else TASK_FOLDER[0]
    evaluate_main([folder, f"--tasks={','.join(task_names)}", "--batch_size=2", "--device=cpu",
                   f"--include_path={include}", *options])


def one_line(task_names, folder, tasks, capsys, *options):
    with pytest.raises(SystemExit) as exited:
        judge(task_names, folder, tasks, *options)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def judged_training(data_dir, out_dir, *settings):
    main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL, "--dropout=0.1", "--max_iters=6",
          "--eval_interval=3", "--eval_iters=1", f"--lm_eval_include_path={TASK_FOLDER[0]}", "--lm_eval_limit=2",
          *settings])


def test_lm_eval_tasks_judge_every_checkpoint_and_leave_the_training_as_it_was(char_data, tasks, tmp_path, capsys):
    judged, plain = str(tmp_path / "judged"), str(tmp_path / "plain")
    judged_training(char_data, judged, "--lm_eval_tasks=shakespeare_ppl,shakespeare_mc")
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("|shakespeare_mc")]) == 2  # lm-eval's table
    scores = read_metrics(judged, "lm_eval")
    assert [r["iter"] for r in scores] == [3, 6]
    assert all(0 < r["lm_eval/shakespeare_ppl/bits_per_byte"] < 10 and 0 <= r["lm_eval/shakespeare_mc/acc"] <= 1
               for r in scores)
    with open(os.path.join(judged, "eval_results.json")) as f:
        saved = json.load(f)
    assert saved["iteration"] == 6 and {entry["limit"] for entry in saved["tasks"].values()} == {2}
    assert saved["results"]["shakespeare_mc"]["acc"] == scores[-1]["lm_eval/shakespeare_mc/acc"]
    card = ModelCard.load(os.path.join(judged, "README.md"))
    assert {r.dataset_name for r in card.data.eval_results} == {"shakespeare_ppl", "shakespeare_mc"}

    # lm-eval seeds every generator; with dropout on, the run's weights must not notice
    judged_training(char_data, plain)
    assert sha256(os.path.join(judged, "model.safetensors")) == sha256(os.path.join(plain, "model.safetensors"))
    assert [r["val/loss"] for r in read_metrics(judged, "eval")] == [r["val/loss"] for r in read_metrics(plain, "eval")]
    assert not os.path.exists(os.path.join(plain, "eval_results.json"))

    main(["--init_from=resume", f"--out_dir={judged}", "--max_iters=9", "--lr_decay_iters=9"])  # the card changed
    # it still resumes (card and manifest agree), and the checkpoint it starts from is not judged twice
    assert [r["iter"] for r in read_metrics(judged, "lm_eval")] == [3, 6, 9]


def test_a_failing_lm_eval_task_is_a_warning_and_an_unknown_one_is_refused_before_training(char_data, tasks,
                                                                                            tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    judged_training(char_data, out_dir, "--lm_eval_tasks=shakespeare_gen")  # a char model cannot generate
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: lm-eval")]
    assert len(warnings) == 2 and warnings[0].startswith(f"warning: lm-eval on {out_dir} failed (shakespeare_gen is "
                                                         "a generation task, and ")
    assert warnings[0].endswith("); the run goes on")
    assert checkpoint.read_trainer_state(out_dir).iter_num == 6 and not read_metrics(out_dir, "lm_eval")

    with pytest.raises(SystemExit) as exited:
        judged_training(char_data, str(tmp_path / "typo"), "--lm_eval_tasks=shakespeare_pl")
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: unknown lm-eval task 'shakespeare_pl'")
    assert err.count("\n") == 1 and not os.path.exists(tmp_path / "typo")


def test_an_eval_only_run_judges_its_model_and_writes_nothing(bpe_folder, bpe_data, tasks, tmp_path, capsys):
    before = {name: sha256(os.path.join(bpe_folder, name)) for name in os.listdir(bpe_folder)
              if os.path.isfile(os.path.join(bpe_folder, name))}
    main([f"--init_from={bpe_folder}", f"--data_dir={bpe_data}", f"--out_dir={tmp_path / 'none'}", "--eval_only=True",
          "--eval_iters=1", "--batch_size=2", "--device=cpu", "--compile=False", "--lm_eval_tasks=shakespeare_mc",
          f"--lm_eval_include_path={TASK_FOLDER[0]}", "--lm_eval_limit=2"])
    assert "|shakespeare_mc" in capsys.readouterr().out
    assert before == {name: sha256(os.path.join(bpe_folder, name)) for name in before}
    assert not os.path.exists(os.path.join(bpe_folder, "eval_results.json")) and not os.path.exists(tmp_path / "none")


def test_without_lm_eval_installed_the_tasks_are_skipped_with_a_warning(char_data, tasks, tmp_path):
    """The eval presets name tasks, and must still run on requirements.txt alone."""
    shadow = tmp_path / "shadow" / "lm_eval"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named lm_eval')\n")
    out_dir = tmp_path / "out"
    result = subprocess.run([sys.executable, "train.py", f"--data_dir={char_data}", f"--out_dir={out_dir}",
                             *TINY_MODEL, "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                             "--lm_eval_tasks=hellaswag"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(shadow.parent)})
    assert result.returncode == 0, result.stderr
    assert "warning: lm_eval_tasks skipped: lm-eval is not installed: pip install -r requirements-eval.txt" in (
        result.stdout + result.stderr)
    assert checkpoint.read_trainer_state(str(out_dir)).iter_num == 2
