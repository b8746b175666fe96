"""Model folders judged by EleutherAI's lm-evaluation-harness (requirements-eval.txt), as a user
of it would: HFLM on the folder, local tasks of each request type lm-eval has."""
import json
import os

import pytest

from conftest import TINY_MODEL
from gpt_train.cli import train as main

lm_eval = pytest.importorskip("lm_eval", reason="pip install -r requirements-eval.txt")  # requirements-dev has it
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

MAX_GEN_TOKS = 10  # far below half the context: the length at which the old folders overflowed


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
    return TaskManager(include_path=str(folder))


def trained(data_dir, out_dir):
    main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL, "--max_iters=4", "--eval_interval=4",
          "--eval_iters=1"])
    return out_dir


def evaluate(folder, task_names, task_manager, **model_args):
    lm = HFLM(pretrained=folder, batch_size=2, device="cpu", **model_args)
    return lm_eval.simple_evaluate(model=lm, tasks=task_names, task_manager=task_manager, log_samples=False,
                                   verbosity="ERROR")["results"]


def test_lm_eval_scores_and_generates_past_half_the_context_on_a_bpe_folder(bpe_data, tmp_path, tasks, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = trained(bpe_data, str(tmp_path / "bpe"))
    results = evaluate(folder, ["shakespeare_ppl", "shakespeare_mc", "shakespeare_gen"], tasks)
    assert 0 < results["shakespeare_ppl"]["bits_per_byte,none"] < 20
    assert 0 <= results["shakespeare_mc"]["acc,none"] <= 1
    assert results["shakespeare_gen"]["exact_match,none"] == 0.0  # ran: contexts cut to fit, no IndexError


def test_lm_eval_scores_a_char_folder_with_a_newline_prefix(char_data, tmp_path, tasks, monkeypatch):
    """A char vocabulary has no BOS/EOS: lm-eval's prefix_token_id names what starts a text."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = trained(char_data, str(tmp_path / "char"))
    results = evaluate(folder, ["shakespeare_ppl", "shakespeare_mc"], tasks, prefix_token_id=0)  # 0 is "\n"
    assert 0 < results["shakespeare_ppl"]["bits_per_byte,none"] < 10
    assert 0 <= results["shakespeare_mc"]["acc,none"] <= 1
