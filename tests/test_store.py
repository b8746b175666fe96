"""out_dir on object storage (gpt_train.store), against S3's API served for real on loopback:
moto's server reached through s3fs over HTTP, as a run on a cloud machine reaches AWS."""
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import DATASETS_CACHE, ROOT, TINY_MODEL, free_port, one_line_error, read_metrics, run_script, sha256
from gpt_train import store as store_module
from gpt_train.cli import load_config
from gpt_train.errors import UserError
from gpt_train.sample import SampleConfig, sample
from gpt_train.store import CHECKPOINTS, LEASE, Lease, Store, model_folder, working_copy
from gpt_train.train import train

SECRET = "gpt-train-test-secret-never-written"  # a fake credential: it must appear in no file and no log


@pytest.fixture(scope="module")
def s3():
    """S3's endpoint on 127.0.0.1 (moto's server mode), and the environment a user sets for AWS."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        pytest.skip(f"moto's server is not installed ({e}): pip install -r requirements-dev.txt")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(port), verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "gpt-train-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield env
    server.stop()
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def bucket(s3, tmp_path, monkeypatch):
    """A new bucket, and a cache of local copies of its own (a fresh machine for each test)."""
    import s3fs
    name = f"runs-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    monkeypatch.setenv("GPT_TRAIN_CACHE", str(tmp_path / "cache"))
    return name


def store_args(char_data, out_dir, *extra):
    return [f"--data_dir={char_data}", f"--out_dir={out_dir}", *TINY_MODEL, "--dropout=0.1", "--eval_interval=2",
            "--eval_iters=2", "--always_save_checkpoint=True", *extra]


def objects(url):
    store = Store(url)
    store.fs.invalidate_cache()
    return sorted(p[len(store.root) + 1:] for p in store.fs.find(store.root))


def test_a_run_on_s3_publishes_each_checkpoint_and_resumes_on_another_machine_exactly(char_data, bucket, tmp_path,
                                                                                      capsys):
    url = f"s3://{bucket}/shakespeare/run1"
    train(load_config(store_args(char_data, url, "--max_iters=4")))
    printed = capsys.readouterr().out
    assert f"uploaded the checkpoint at iteration 4 to {url}/{CHECKPOINTS}/0000000004-" in printed
    assert not os.path.exists("s3:") and not os.path.exists(tmp_path / "s3:")  # never a local folder named s3:
    stored = objects(url)
    manifests = [name for name in stored if name.startswith(CHECKPOINTS) and name.count("/") == 1]
    assert len(manifests) == 1  # the checkpoint at 2 went once the one at 4 was committed
    name = manifests[0][len(CHECKPOINTS) + 1:-len(".json")]
    with Store(url).fs.open(f"{bucket}/shakespeare/run1/{manifests[0]}") as f:
        record = json.load(f)
    assert record["iteration"] == 4 and "model.safetensors" in record["files"]
    assert "training_state/trainer_state.json" in record["files"]
    assert {f"{CHECKPOINTS}/{name}/{rel}" for rel in record["files"]} | {manifests[0]} == {
        o for o in stored if o.startswith(CHECKPOINTS)}  # every object is in the manifest, and no other
    assert {"metrics.jsonl", "training_config.json", "loss.png"} <= set(stored) and LEASE not in stored

    shutil.rmtree(working_copy(url))  # another machine: nothing local, the store holds the run
    train(load_config(store_args(char_data, url, "--max_iters=8", "--init_from=resume")))
    printed = capsys.readouterr().out
    assert f"brought the checkpoint at iteration 4 from {url}" in printed and "resuming from iteration 4" in printed
    whole = str(tmp_path / "whole")
    train(load_config(store_args(char_data, whole, "--max_iters=8")))
    resumed = model_folder(url, "out_dir")
    assert sha256(os.path.join(resumed, "model.safetensors")) == sha256(os.path.join(whole, "model.safetensors"))
    assert [r["val/loss"] for r in read_metrics(working_copy(url), "eval")] == [
        r["val/loss"] for r in read_metrics(whole, "eval")]

    out = io.StringIO()
    sample(load_config([f"--out_dir={url}", "--device=cpu", "--num_samples=1", "--max_new_tokens=20",
                        "--start=ROMEO:"], SampleConfig), out)
    assert out.getvalue().startswith("ROMEO:")


def test_a_second_read_downloads_nothing_and_a_damaged_object_is_refused_in_one_line(char_data, bucket,
                                                                                    monkeypatch):
    url = f"s3://{bucket}/run"
    train(load_config(store_args(char_data, url, "--max_iters=2")))
    first = model_folder(url, "out_dir")
    store = Store(url)
    with monkeypatch.context() as patch:
        patch.setattr(type(store.fs), "get_file", lambda *a, **k: pytest.fail("downloaded again"))
        assert model_folder(url, "out_dir") == first
    shutil.rmtree(os.path.dirname(first))  # the cache gone: read from the store again
    name, newest = store.newest()
    store.fs.pipe_file(store.path(CHECKPOINTS, name, "model.safetensors"), b"not the weights")
    with pytest.raises(UserError, match=rf"the checkpoint {url}/{CHECKPOINTS}/{name} is damaged: model.safetensors "
                                        "has 15 bytes, the checkpoint wrote"):
        model_folder(url, "out_dir")
    shutil.rmtree(os.path.dirname(first))  # what the refused read kept (the whole files) goes too
    store.fs.rm_file(store.path(CHECKPOINTS, name, "config.json"))
    with pytest.raises(UserError, match="is damaged: config.json is missing"):
        model_folder(url, "out_dir")


def test_logs_that_grow_while_a_checkpoint_uploads_are_stored_as_digested(char_data, bucket, monkeypatch, capsys):
    """With async_save the loop goes on appending to metrics.jsonl while the checkpoint uploads: the
    checkpoint holds each log as it was digested, and a resume on another machine reads it. Found in
    the full suite as `is damaged: metrics.jsonl has 1404 bytes, the checkpoint wrote 1164`; here
    every upload lets the loop write its next record first."""
    url = f"s3://{bucket}/run"
    fs, metrics = Store(url).fs, os.path.join(working_copy(url), "metrics.jsonl")  # fsspec shares its instances
    put_file, uploads = fs.put_file, []

    def put_while_the_loop_logs(local, remote, *args, **kwargs):
        with open(metrics, "rb+") as f:
            f.write(f.readlines()[-1])  # the loop's next record, mid-upload
        uploads.append(remote)
        return put_file(local, remote, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(fs, "put_file", put_while_the_loop_logs)
        train(load_config(store_args(char_data, url, "--max_iters=2")))
    assert any(f"/{CHECKPOINTS}/" in remote for remote in uploads)  # the checkpoint's upload went through it
    shutil.rmtree(working_copy(url))  # another machine
    train(load_config(store_args(char_data, url, "--max_iters=4", "--init_from=resume")))
    assert "resuming from iteration 2" in capsys.readouterr().out


def test_a_second_writer_is_refused_until_the_first_ones_lease_goes_stale(char_data, bucket, monkeypatch, capsys):
    url = f"s3://{bucket}/run"
    other = Lease(Store(url)).take()  # a run on another machine
    other.holder = "pid 1 on elsewhere"
    try:
        with pytest.raises(UserError, match=rf"{url} is in use by another training run \(pid \d+ on "):
            train(load_config(store_args(char_data, url, "--max_iters=2")))
    finally:
        other._stop.set()  # the other machine dies: its lease is no longer refreshed
    monkeypatch.setattr(store_module, "LEASE_STALE_S", 0.0)
    train(load_config(store_args(char_data, url, "--max_iters=2")))
    assert "that run is gone, this one takes over" in capsys.readouterr().out
    with pytest.raises(UserError, match="was taken over by another run"):
        other.check()  # the old holder, were it alive, would commit nothing more


def test_overwrite_deletes_only_what_gpt_train_wrote_under_the_prefix(char_data, bucket, capsys):
    url = f"s3://{bucket}/run"
    train(load_config(store_args(char_data, url, "--max_iters=2")))
    fs = Store(url).fs
    fs.pipe_file(f"{bucket}/run/notes.txt", b"mine")
    fs.pipe_file(f"{bucket}/run-other/model.safetensors", b"another prefix")
    with pytest.raises(UserError, match=f"{url} holds another training run \\(a checkpoint at iteration 2\\)"):
        train(load_config(store_args(char_data, url, "--max_iters=2")))
    train(load_config(store_args(char_data, url, "--max_iters=2", "--overwrite_output_dir=True")))
    assert f"removed the previous run in {url}: checkpoints, loss.png, metrics.jsonl, training_config.json" in \
        capsys.readouterr().out
    assert fs.cat_file(f"{bucket}/run/notes.txt") == b"mine"
    assert fs.cat_file(f"{bucket}/run-other/model.safetensors") == b"another prefix"


def test_store_mistakes_are_one_line(char_data, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_TRAIN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"out_dir='s3://no-such-bucket-here/run': the bucket does not exist"):
        train(load_config(store_args(char_data, "s3://no-such-bucket-here/run", "--max_iters=2")))
    with pytest.raises(UserError, match=r"out_dir='gs://b/run' is on gs://, whose filesystem is not installed .*: "
                                        "pip install gcsfs"):
        train(load_config(store_args(char_data, "gs://b/run", "--max_iters=2")))
    with pytest.raises(UserError, match=r"fsspec knows no nosuch:// filesystem"):
        train(load_config(store_args(char_data, "nosuch://b/run", "--max_iters=2")))
    with pytest.raises(UserError, match=r"init_from='s3://no-such-bucket-here/run': the bucket does not exist"):
        model_folder("s3://no-such-bucket-here/run", "init_from")
    assert not os.path.exists("s3:") and not os.path.exists("gs:")


class StallingProxy:
    """A TCP relay on loopback in front of the S3 server that, once told, holds the first request
    whose request line matches (a server that stalls mid-upload): the upload neither ends nor fails."""

    def __init__(self, upstream_port):
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stall_on, self.stalled, self.fail_on = None, threading.Event(), None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=30)
                server.settimeout(None)
            except OSError:  # the server refused this one: the client sees a dropped connection, the next gets in
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source, sink, upload):
        # On a kept-alive connection a request line may start mid-chunk (after the last body's end)
        # or be split between two reads: look in what is new plus the tail of what came before.
        seen = b""
        try:
            while chunk := source.recv(65536):
                seen = seen[-300:] + chunk
                if upload and self.fail_on and re.search(self.fail_on, seen, re.MULTILINE):
                    return  # the connection drops mid-request: a server failing mid-upload
                if upload and self.stall_on and re.search(self.stall_on, seen, re.MULTILINE):
                    self.stalled.set()
                    time.sleep(3600)  # held: the client waits on a server that never answers
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_a_kill_9_mid_upload_leaves_the_last_checkpoint_and_resume_from_the_store_is_exact(char_data, s3, bucket,
                                                                                         tmp_path, async_save):
    """Stalled while uploading the checkpoint at iteration 4, then killed: the store keeps the one at
    2 whole; a resume on a machine with nothing local continues from it to the uninterrupted weights.
    With async_save the loop trains on while the upload stalls, until the next save waits for it."""
    url = f"s3://{bucket}/run"
    proxy = StallingProxy(int(s3["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1]))
    proxy.stall_on = rb"^PUT /[^ ]*/checkpoints/0000000004-[0-9a-f]+/model\.safetensors"
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy.port}", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": DATASETS_CACHE}
    run = subprocess.Popen([sys.executable, "train.py", *store_args(char_data, url, "--max_iters=8",
                                                                     f"--async_save={async_save}")],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stalled, began = False, time.monotonic()
        while not stalled and run.poll() is None and time.monotonic() - began < 120:
            stalled = proxy.stalled.wait(0.5)
        time.sleep(3 if async_save else 0.5)
    finally:
        run.send_signal(signal.SIGKILL)
        printed = run.communicate(timeout=60)[0]
        proxy.close()
    assert stalled, f"the upload of the checkpoint at iteration 4 never started:\n{printed}"
    assert "uploaded the checkpoint at iteration 2" in printed and "iteration 4 to" not in printed, printed
    assert ("iter 5: loss" in printed) == async_save, printed  # in the background the stalled upload held no step
    store = Store(url)
    name, newest = store.newest()
    assert newest["iteration"] == 2
    partial = [o for o in objects(url) if o.startswith(f"{CHECKPOINTS}/0000000004-")]
    assert partial and not [o for o in partial if o.count("/") == 1]  # objects of 4, and no manifest for them

    shutil.rmtree(os.environ["GPT_TRAIN_CACHE"])  # a new machine, at once: the dead run's lease is taken over
    result = run_script("train.py", *store_args(char_data, url, "--max_iters=8", "--init_from=resume"))
    assert "its process is gone: that run is gone, this one takes over" in result.stdout
    assert "resuming from iteration 2" in result.stdout
    whole = str(tmp_path / "whole")
    run_script("train.py", *store_args(char_data, whole, "--max_iters=8"))
    name, newest = store.newest()
    assert newest["iteration"] == 8 and not [o for o in objects(url) if o.startswith(f"{CHECKPOINTS}/0000000004-")]
    assert sha256(os.path.join(model_folder(url, "out_dir"), "model.safetensors")) == sha256(
        os.path.join(whole, "model.safetensors"))
    sampled = run_script("sample.py", f"--out_dir={url}", "--device=cpu", "--num_samples=1", "--max_new_tokens=10",
                         "--start=ROMEO:")
    assert sampled.stdout.startswith("ROMEO:")


def test_wrong_credentials_are_one_line(char_data, bucket, monkeypatch):
    import moto.core.responses
    import moto.settings
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks keys from now on
    monkeypatch.setattr(moto.core.responses.ActionAuthenticatorMixin, "request_count", 0)
    with pytest.raises(UserError, match=rf"could not list s3://{bucket}/run \(PermissionError: The AWS Access Key Id "
                                        r"you provided does not exist in our records.\): check the credentials"):
        train(load_config(store_args(char_data, f"s3://{bucket}/run", "--max_iters=2")))


def test_no_credential_is_written_anywhere(char_data, bucket, tmp_path, capsys):
    url = f"s3://{bucket}/run"
    train(load_config(store_args(char_data, url, "--max_iters=2", "--wandb_project=p")))
    printed = "".join(capsys.readouterr())
    assert SECRET not in printed
    for root, _, names in os.walk(tmp_path):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert SECRET.encode() not in f.read(), os.path.join(root, name)
    fs = Store(url).fs
    for key in fs.find(bucket):
        assert SECRET.encode() not in fs.cat_file(key), key


@pytest.mark.slow
def test_push_and_convert_read_a_run_on_the_store_and_what_would_write_there_is_one_line(char_data, bucket,
                                                                                       tmp_path, hub, capsys):
    from gpt_train import push
    from gpt_train.convert import main as convert_main
    url = f"s3://{bucket}/run"
    train(load_config(store_args(char_data, url, "--max_iters=2")))
    push.main([url, "someone/tiny"])
    assert "model.safetensors" in hub.uploads()[-1][3] and f"pushed {url} to " in capsys.readouterr().out
    gguf = str(tmp_path / "tiny.gguf")
    convert_main(["to-gguf", url, gguf])
    assert os.path.getsize(gguf) > 0 and capsys.readouterr().out.splitlines()[-1] == f"wrote {gguf}"
    assert one_line_error(convert_main, ["to-gguf", url], capsys) == (
        f"error: to-gguf writes beside OUT_DIR, and {url} is on a store: name GGUF_FILE")
    assert one_line_error(convert_main, ["upgrade", url], capsys) == (
        f"error: upgrade writes into OUT_DIR, and {url} is on a store: give a local folder")


@pytest.mark.slow
def test_a_store_that_fails_mid_upload_stops_the_run_in_one_line_keeping_the_last_checkpoint(char_data, s3, bucket,
                                                                                            monkeypatch, capsys):
    import s3fs

    from gpt_train.commands import train as main
    proxy = StallingProxy(int(s3["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1]))
    proxy.fail_on = rb"^PUT /[^ ]*/checkpoints/0000000004-[0-9a-f]+/model\.safetensors"
    url = f"s3://{bucket}/run"
    with monkeypatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{proxy.port}")
        patch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: s3fs's still run, in seconds
        s3fs.S3FileSystem.clear_instance_cache()  # a client for the endpoint now set
        try:
            error = one_line_error(main, store_args(char_data, url, "--max_iters=8"), capsys)
        finally:
            proxy.close()
            s3fs.S3FileSystem.clear_instance_cache()
    assert error.startswith(f"error: could not upload the checkpoint at iteration 4 to {url} ("), error
    assert error.endswith("run again (a resume continues from the last checkpoint)")
    assert Store(url).newest()[1]["iteration"] == 2
