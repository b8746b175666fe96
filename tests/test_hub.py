"""Pushing to the Hub, tested at the huggingface_hub API boundary (the Hub itself is unreachable here).

HfApi.create_repo and HfApi.upload_folder are replaced by recorders; everything on our side of
them (settings, the training loop, snapshots, the background thread, the push command) is real.
"""
import os
import threading

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard, parse_eval_result_entries
from transformers import AutoModelForCausalLM

from conftest import TOKEN, run_script, tree_digest
from gpt_train import checkpoint, push
from gpt_train.cli import load_config
from gpt_train.errors import UserError
from gpt_train.evaluate import save_results
from gpt_train.hub import HubPusher
from gpt_train.out_dir import written_by_gpt_train
from gpt_train.train import train

PUBLISHED = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "training_config.json", "loss.png"}


def tiny_push_run(tiny_run, *extra):
    out_dir, args = tiny_run
    return out_dir, train(load_config([*args, "--max_iters=6", "--eval_interval=3", "--eval_iters=1",
                                       "--always_save_checkpoint=True", "--push_to_hub=True",
                                       "--hub_model_id=someone/tiny-shakespeare", *extra]))


def test_every_save_pushes_each_checkpoint_from_a_background_thread_and_never_the_token(tiny_run, hub, capsys):
    out_dir, _ = tiny_push_run(tiny_run, "--hub_strategy=every_save", "--hub_private_repo=True")
    uploads = hub.uploads()
    assert [u[2] for u in uploads] == ["Training in progress, iteration 3", "Training in progress, iteration 6"]
    assert all(u[1] == "someone/tiny-shakespeare" and u[4].startswith("hub-upload") for u in uploads)
    # no training_state/, metrics.jsonl or staging; the chart once drawn (a run of seconds: at its last eval)
    assert set(uploads[-1][3]) == PUBLISHED and all(set(u[3]) | {"loss.png"} == PUBLISHED for u in uploads)
    creates = [c for c in hub.calls if c[0] == "create_repo"]
    assert creates and all(c[1] == "someone/tiny-shakespeare" and c[2]["private"] is True for c in creates)
    with open(os.path.join(out_dir, "model.safetensors"), "rb") as f:
        assert uploads[-1][3]["model.safetensors"] == f.read()
    assert b"| iteration | 3 |" in uploads[0][3]["README.md"] and b"| iteration | 6 |" in uploads[1][3]["README.md"]
    printed = capsys.readouterr().out
    assert f"pushed 'Training in progress, iteration 6' to the Hub ({', '.join(sorted(PUBLISHED))}): " \
           "https://huggingface.co/someone/tiny-shakespeare" in printed
    assert not [n for n in os.listdir(out_dir) if n.startswith(".")]  # snapshots cleaned up
    assert_token_absent(out_dir, printed, uploads)


def assert_token_absent(out_dir, printed, uploads):
    """HF_TOKEN (set by the `hub` fixture) is in no file of out_dir, not in the log, not uploaded."""
    assert TOKEN not in printed
    for root, _, names in os.walk(out_dir):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert TOKEN.encode() not in f.read(), os.path.join(root, name)
    assert all(TOKEN.encode() not in content for u in uploads for content in u[3].values())


def test_end_strategy_pushes_once_after_training(tiny_run, hub):
    tiny_push_run(tiny_run, "--hub_strategy=end")
    assert [u[2] for u in hub.uploads()] == ["End of training, iteration 6"]


def test_failed_uploads_warn_training_goes_on_and_the_run_ends_saying_how_to_push_again(tiny_run, hub, capsys):
    hub.fail = True
    out_dir = tiny_run[0]
    with pytest.raises(UserError, match=rf"training finished and {out_dir} is complete, but its upload to "
                                        r"someone/tiny-shakespeare failed \(HfHubHTTPError: 503 Server Error.*\): push "
                                        rf"it again with `python -m gpt_train.push {out_dir} someone/tiny-shakespeare`"):
        tiny_push_run(tiny_run, "--hub_strategy=every_save")
    assert len(hub.uploads()) == 2
    printed = capsys.readouterr().out
    assert "warning: upload 'Training in progress, iteration 3' to someone/tiny-shakespeare failed" in printed
    assert "step 6: train loss" in printed and "best val loss" in printed  # trained to the end first
    assert AutoModelForCausalLM.from_pretrained(out_dir).config.n_layer == 2  # local checkpoint intact


def test_upload_sends_the_snapshot_taken_at_save_time(tmp_path, hub):
    """A later save replacing files (as checkpoints do) cannot change an upload already queued."""
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_text(f"{name} v1")
    (folder / "metrics.jsonl").write_text("{}")
    hub.gate = threading.Event()
    cfg = load_config(["--push_to_hub=True", "--hub_model_id=someone/x"])
    pusher = HubPusher(cfg, report=lambda *a: None, is_main_process=True)
    pusher.after_save(str(folder), 1)
    (folder / "model.safetensors.tmp").write_text("model.safetensors v2")
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    hub.gate.set()
    pusher.finish(str(folder), 1)
    assert hub.uploads()[0][3] == {"config.json": b"config.json v1", "model.safetensors": b"model.safetensors v1"}


def test_only_the_main_process_pushes(tmp_path, hub):
    cfg = load_config(["--push_to_hub=True", "--hub_model_id=someone/x", "--hub_strategy=end"])
    pusher = HubPusher(cfg, report=print, is_main_process=False)
    pusher.after_save(str(tmp_path), 1)
    pusher.finish(str(tmp_path), 1)
    assert hub.calls == []


@pytest.mark.parametrize("args, message", [
    (["--push_to_hub=True"], "push_to_hub=True needs hub_model_id"),
    (["--hub_strategy=checkpoint"], "hub_strategy must be one of end, every_save, got 'checkpoint'"),
    (["--push_to_hub=True", "--hub_model_id=not a repo"], "'not a repo' is not a Hub repository id"),
    (["--hub_token=hf_abc"], "unknown setting 'hub_token'"),
])
def test_hub_settings_are_validated(args, message):
    with pytest.raises(UserError) as raised:
        load_config(args)
    assert str(raised.value).startswith(message) and "hf_abc" not in str(raised.value)


def test_push_without_a_token_stops_before_training(tiny_run, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("gpt_train.hub.get_token", lambda: None)  # huggingface_hub finds no login either
    with pytest.raises(UserError, match="needs a Hugging Face token"):
        tiny_push_run(tiny_run)


def test_push_command_uploads_a_trained_folder(tiny_run, hub, capsys):
    out_dir, args = tiny_run
    train(load_config([*args, "--max_iters=2", "--eval_interval=2", "--eval_iters=1"]))
    push.main([out_dir, "someone/pushed", "--private"])
    (upload,) = hub.uploads()
    assert upload[1:3] == ("someone/pushed", push.COMMIT_MESSAGE) and set(upload[3]) == PUBLISHED
    assert [c[1:3] for c in hub.calls if c[0] == "create_repo"] == [("someone/pushed", {"private": True, "exist_ok": True})]
    assert "pushed " + out_dir + " to https://huggingface.co/someone/pushed/commit/abc123" in capsys.readouterr().out


def test_push_sends_the_model_folders_own_files_never_a_users_file_or_a_symlinks_target(tiny_run, hub, tmp_path,
                                                                                           capsys):
    out_dir, args = tiny_run
    train(load_config([*args, "--max_iters=2", "--eval_interval=2", "--eval_iters=1"]))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    (tmp_path / "out" / "my_notes.txt").write_text("not for the Hub")
    os.symlink(token_file, os.path.join(out_dir, "secret.json"))
    os.remove(os.path.join(out_dir, "loss.png"))
    os.symlink(token_file, os.path.join(out_dir, "loss.png"))  # a published name, pointing at the token
    push.main([out_dir, "someone/pushed"])
    (upload,) = hub.uploads()
    sent = sorted(PUBLISHED - {"loss.png"})
    assert sorted(upload[3]) == sent
    assert all(TOKEN.encode() not in content for content in upload[3].values())
    assert capsys.readouterr().out.strip().endswith(f": {', '.join(sent)}")  # says which files went up


@pytest.mark.slow
def test_push_command_errors_are_one_line(tmp_path):
    result = run_script("-m", "gpt_train.push", str(tmp_path / "missing"), "someone/x", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'missing'} does not exist")
    with pytest.raises(UserError, match="is not a model folder"):
        push.push(str(tmp_path), "someone/x")


def lm_eval_results(limit=None):
    """simple_evaluate's dict as lm-eval 0.4.13 returns it, the parts gpt-train reads: three benchmarks
    whose data are Hub datasets (as lm-eval's own task files name them) and a task on local files."""
    return {
        "results": {
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.2891, "acc_stderr,none": 0.0045,
                          "acc_norm,none": np.float64(0.3114), "acc_norm_stderr,none": 0.0046},  # numpy's mean
            "arc_easy": {"alias": "arc_easy", "acc,none": 0.4381, "acc_norm,none": 0.3948},
            "lambada_openai": {"alias": "lambada_openai", "perplexity,none": 40.06, "acc,none": 0.3256},
            "my_ppl": {"alias": "my_ppl", "bits_per_byte,none": 2.747},
        },
        "configs": {
            "hellaswag": {"task": "hellaswag", "dataset_path": "Rowan/hellaswag", "num_fewshot": 0},
            "arc_easy": {"task": "arc_easy", "dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy",
                         "num_fewshot": 0},
            "lambada_openai": {"task": "lambada_openai", "dataset_path": "EleutherAI/lambada_openai",
                               "dataset_name": "default", "num_fewshot": 0},
            "my_ppl": {"task": "my_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "d.jsonl"}},
                       "num_fewshot": 0},
        },
        "n-shot": {"hellaswag": 0, "arc_easy": 0, "lambada_openai": 0, "my_ppl": 0},
        "config": {"model": "hf", "limit": limit, "gen_kwargs": None},
        "date": 1764547200.5,  # 2025-12-01, when lm-eval started
    }


def test_hub_benchmarks_scores_are_written_in_the_hubs_format_pushed_and_dropped_by_the_next_checkpoint(
        tiny_run, hub, capsys):
    out_dir, args = tiny_run
    train(load_config([*args, "--max_iters=2", "--eval_interval=2", "--eval_iters=1"]))
    scores, written = save_results(out_dir, lm_eval_results())
    assert written == [".eval_results/hellaswag.yaml", ".eval_results/arc_easy.yaml",
                       ".eval_results/lambada_openai.yaml"]  # my_ppl's data are local files: no leaderboard
    assert sorted(os.listdir(os.path.join(out_dir, ".eval_results"))) == \
        ["arc_easy.yaml", "hellaswag.yaml", "lambada_openai.yaml"]
    read = {}
    for name in written:
        with open(os.path.join(out_dir, name), encoding="utf-8") as f:
            (read[name],) = parse_eval_result_entries(yaml.safe_load(f))  # the Hub's own reader of the format
    hellaswag = read[".eval_results/hellaswag.yaml"]
    assert (hellaswag.dataset_id, hellaswag.task_id, hellaswag.value) == ("Rowan/hellaswag", "hellaswag", 0.3114)
    assert hellaswag.date == "2025-12-01T00:00:00Z" and hellaswag.notes == "acc_norm, 0-shot"
    assert hellaswag.source_url == "https://github.com/EleutherAI/lm-evaluation-harness"
    assert hellaswag.source_name.startswith("lm-evaluation-harness 0.4.13")  # requirements-eval.txt's
    arc = read[".eval_results/arc_easy.yaml"]
    assert (arc.dataset_id, arc.task_id, arc.value) == ("allenai/ai2_arc", "arc_easy", 0.3948)
    lambada = read[".eval_results/lambada_openai.yaml"]
    assert (lambada.dataset_id, lambada.value, lambada.notes) == ("EleutherAI/lambada_openai", 0.3256, "acc, 0-shot")
    assert scores["my_ppl"] == {"bits_per_byte": 2.747}  # still in eval_results.json and the card
    card = ModelCard.load(os.path.join(out_dir, "README.md"))
    assert {r.dataset_name for r in card.data.eval_results} == {"hellaswag", "arc_easy", "lambada_openai", "my_ppl"}
    assert checkpoint.read_trainer_state(out_dir).iter_num == 2  # the manifest follows the card

    push.main([out_dir, "someone/pushed"])
    (upload,) = hub.uploads()
    assert set(upload[3]) == PUBLISHED | {"eval_results.json", *written}
    with open(os.path.join(out_dir, written[0]), "rb") as f:
        assert upload[3][written[0]] == f.read()

    # part of each benchmark is no benchmark score: none for the leaderboards, and the whole ones stay
    before = tree_digest(os.path.join(out_dir, ".eval_results"), os.path.join(out_dir, "eval_results.json"))
    save_results(out_dir, lm_eval_results(limit=100))
    out = capsys.readouterr().out
    assert "note: no .eval_results/ for the Hub's leaderboards: scored on 100 examples per task" in out
    assert "note: hellaswag's scores on the whole benchmark stay in eval_results.json" in out
    assert tree_digest(os.path.join(out_dir, ".eval_results"), os.path.join(out_dir, "eval_results.json")) == before
    train(load_config(["--init_from=resume", f"--out_dir={out_dir}", "--max_iters=4", "--lr_decay_iters=4"]))
    assert not os.path.exists(os.path.join(out_dir, ".eval_results"))  # they described the older weights
    assert written_by_gpt_train(".eval_results")  # so overwrite_output_dir removes them with the run
