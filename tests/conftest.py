"""Shared fixtures: the real Shakespeare data prepared once, tiny model settings, CLI runners."""
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

import httpx
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 on two cores: one torch thread per worker and per process it starts, or the
    # workers' thread pools oversubscribe the cores and small ops slow down tenfold
    os.environ["OMP_NUM_THREADS"] = "1"
# The test files that take longest (seconds on one worker, measured with --junitxml on 2026-12-07),
# slowest first. With --dist=loadfile and --no-loadscope-reorder (pyproject.toml) xdist hands the
# files out in collection order: the long ones start at once and the short ones fill the gaps,
# instead of the longest starting last while the other worker idles. A file not listed runs after
# these, in its usual order; a stale list costs minutes, never a test.
SLOWEST_FIRST = ["test_loss.py", "test_readme_walk.py", "test_restarts.py", "test_stream.py", "test_slurm.py",
                 "test_store.py", "test_ray.py", "test_fsdp.py", "test_recipes.py",
                 "test_user_paths.py", "test_reliability.py", "test_muon.py", "test_memory.py", "test_run_folder.py",
                 "test_lm_eval.py", "test_distributed.py", "test_gpu_checks.py", "test_auto_batch.py"]


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable within a file


# datasets caches what it loads; tests keep theirs out of the user's ~/.cache.
DATASETS_CACHE = os.path.join(tempfile.gettempdir(), f"gpt-train-tests-datasets-{os.getuid()}")
os.environ["HF_DATASETS_CACHE"] = DATASETS_CACHE

# A GPT-2 small enough that a training step takes milliseconds on one CPU core.
TINY_MODEL = ["--gradient_accumulation_steps=1", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
              "--device=cpu", "--compile=False", "--dropout=0.0", "--log_interval=1",
              "--learning_rate=3e-3", "--warmup_iters=5", "--min_lr=3e-4", "--beta2=0.99"]


def run_script(*args, env=None, check=True):
    """Run a repo script (or `-m module`) as a user would, from the repo root."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": DATASETS_CACHE, **(env or {})}
    # a hung run (a process waiting for a peer that has gone) fails the test instead of the whole suite
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@contextlib.contextmanager
def torch_threads(count):
    """In-process runs at the thread count of the launched processes they are compared with
    (OMP_NUM_THREADS=1 there): a reference run needs no interpreter of its own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def free_port():
    """A port nobody listens on now: runs of the suite side by side must not share a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree_digest(*paths):
    """{path: sha256} of the files and of every file under the folders: equal digests, untouched files."""
    files = [p for p in map(str, paths) if os.path.isfile(p)]
    files += [os.path.join(root, n) for p in paths for root, _, names in os.walk(p) for n in names]
    return {path: sha256(path) for path in files}


def read_metrics(out_dir, event):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["event"] == event]


def prepared(dataset, tmp_path_factory):
    """data/<dataset> as `python data_prep/<dataset>/prepare.py` writes it (that script is this
    call; the README walk runs the script itself), in a temporary folder: in this process, which
    has imported what the script's interpreter would spend ~5 s importing."""
    from gpt_train.commands import prepare

    out = tmp_path_factory.mktemp("data") / dataset
    prepare([dataset, f"--out_dir={out}"])
    return str(out)


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """data/shakespeare_char, one token per character."""
    return prepared("shakespeare_char", tmp_path_factory)


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory):
    """data/shakespeare, GPT-2 BPE."""
    return prepared("shakespeare", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A "pretrained" GPT-2 folder: GPT-2's vocabulary and tokenizer, a tiny random network."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt_train.tokenizer import GPT2_VOCAB, gpt2_tokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=64, vocab_size=GPT2_VOCAB)
    GPT2LMHeadModel(config).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return str(folder)


TINY_CHECKPOINT_ITER = 4  # the shared tiny run's checkpoint: evaluated at 0, 2 and 4, saved at 2 and 4


@pytest.fixture(scope="session")
def tiny_checkpoint(char_data, tmp_path_factory):
    """A finished tiny char run's out_dir (model folder, training state, metrics), trained once per
    worker in place of a model per test file. Read it, or change a copy (`copy_of`): never it."""
    from gpt_train.commands import train

    out_dir = str(tmp_path_factory.mktemp("tiny_checkpoint") / "out")
    train([f"--data_dir={char_data}", f"--out_dir={out_dir}", *TINY_MODEL, f"--max_iters={TINY_CHECKPOINT_ITER}",
           "--eval_interval=2", "--eval_iters=1"])
    forget_the_run()
    return out_dir


@contextlib.contextmanager
def tmpfs(path, size, read_only=False):
    """A real file system of `size` bytes ("700k") at `path`, full or read-only as a test needs it."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed (it needs root on Linux): {mounted.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def copy_of(folder, tmp_path_factory, name):
    """A copy of `folder` that a module's tests may change, as out_dir would hold it."""
    target = tmp_path_factory.mktemp(name) / "out"
    shutil.copytree(folder, target)
    return str(target)


@pytest.fixture
def tiny_run(char_data, tmp_path):
    """Arguments for a tiny char-level training run into a fresh out_dir."""
    out_dir = str(tmp_path / "out")
    return out_dir, [f"--data_dir={char_data}", f"--out_dir={out_dir}", *TINY_MODEL]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """In-process runs must not inherit the previous test's Accelerator singleton or wandb setup."""
    yield
    forget_the_run()


def forget_the_run():
    """What an in-process run leaves process-wide: Accelerate's singletons, wandb's settings."""
    if "wandb" in sys.modules:  # wandb keeps its settings (WANDB_DIR) process-wide between runs
        sys.modules["wandb"].teardown()
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


TOKEN = "hf_secretTOKENthatmustneverbewritten0123"  # the Hub token the hub fixture sets: never written


class FakeHub:
    """The Hub's API boundary for push tests (the Hub is unreachable here): records what reaches
    huggingface_hub, calls, threads, and the files each upload would send."""

    def __init__(self, fail=False, gate=None):
        self.calls, self.fail, self.gate = [], fail, gate

    def create_repo(self, api, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs, threading.current_thread().name))

    def upload_folder(self, api, *, repo_id, folder_path, commit_message, **kwargs):
        if self.gate is not None:
            self.gate.wait(timeout=30)
        files = {}
        for root, _, names in os.walk(folder_path):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    files[os.path.relpath(os.path.join(root, name), folder_path)] = f.read()
        self.calls.append(("upload_folder", repo_id, commit_message, files, threading.current_thread().name))
        if self.fail:
            request = httpx.Request("POST", f"https://huggingface.co/api/models/{repo_id}/commit/main")
            raise HfHubHTTPError("503 Server Error: Service Unavailable", response=httpx.Response(503, request=request))

        class Commit:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc123"
        return Commit()

    def uploads(self):
        return [c for c in self.calls if c[0] == "upload_folder"]


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: fake.upload_folder(api, **kw))
    return fake


def one_line_error(main, argv, capsys, command_line=None, env=None):
    """Run `main(argv)` in-process, or `command_line` in a fresh interpreter when given, and check it
    ended as every mistake must: exit code 2, no traceback, one `error:` line, last. Returns that line."""
    if command_line:
        result = run_script(*command_line, check=False, env=env)
        code, stderr = result.returncode, result.stderr
    else:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        code, stderr = exited.value.code, capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.strip().endswith(errors[0]), stderr
    return errors[0]


def assert_every_process_reports_the_full_disk(result, out_dir, last_checkpoint):
    """Both processes stop on the same one-line error: none crashed or hung waiting for the other."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr
    assert all(line.startswith(f"error: could not write a checkpoint to {out_dir}: the disk is full") and
               line.endswith(f"the last checkpoint in {out_dir}, at iteration {last_checkpoint}, is intact; "
                             "continue with --init_from=resume") for line in errors)
    assert not any(line.startswith("[rank") for line in result.stderr.splitlines())  # no process's traceback
    from gpt_train.checkpoint import STAGING_DIR
    assert not os.path.exists(os.path.join(out_dir, STAGING_DIR))
