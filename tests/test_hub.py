"""Pushing to the Hub, tested at the huggingface_hub API boundary (the Hub itself is unreachable here).

HfApi.create_repo and HfApi.upload_folder are replaced by recorders; everything on our side of
them (settings, the training loop, snapshots, the background thread, the push command) is real.
"""
import os
import threading

import pytest
from transformers import AutoModelForCausalLM

from conftest import TOKEN, run_script
from gpt_train import push
from gpt_train.cli import load_config
from gpt_train.errors import UserError
from gpt_train.hub import HubPusher
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
    assert all(set(u[3]) == PUBLISHED for u in uploads)  # no training_state/, metrics.jsonl or staging
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
