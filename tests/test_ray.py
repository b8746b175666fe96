"""Ray Train (gpt_train.ray_train): gpt-train's loop in the workers of a real TorchTrainer on a local
Ray instance with two CPU workers, checked against the same run under `accelerate launch`; a worker
killed with SIGKILL is restarted by Ray's FailureConfig and the run ends as if uninterrupted."""
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import ACCELERATE, DATASETS_CACHE, ROOT, TINY_MODEL, free_port, one_line_error, sha256
from gpt_train import ray_train

RUN = [*(a for a in TINY_MODEL if a != "--device=cpu"), "--gradient_accumulation_steps=2", "--dropout=0.1",
       "--eval_interval=50", "--eval_iters=2", "--max_iters=300"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": DATASETS_CACHE,
       "RAY_USAGE_STATS_ENABLED": "0"}


def losses(output):
    """{iteration: 'iter N: loss X'} from the lines a run printed, Ray's `(RayTrainWorker pid=...)` cut off."""
    found = {}
    for line in output.splitlines():
        line = re.sub(r"^\x1b\[36m\(RayTrainWorker pid=\d+\)\x1b\[0m ?", "", line)
        if line.startswith("iter "):
            found[int(line.split()[1].rstrip(":"))] = line.split(",")[0]
    return found


def ray_run(tmp_path, data, *launcher):
    return subprocess.Popen([sys.executable, "-m", "gpt_train.ray_train", "--num-workers=2",
                             f"--storage-path={tmp_path / 'ray'}", *launcher, f"--data_dir={data}",
                             f"--out_dir={tmp_path / 'out'}", *RUN], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def worker_pid(lines, rank):
    """The pid of the Ray worker of global rank `rank`, as Ray's controller announced it."""
    for line in list(lines):
        found = re.search(rf"pid=(\d+)\) world_rank={rank},", line)
        if found:
            return int(found.group(1))
    raise AssertionError(f"Ray named no worker of rank {rank}:\n{''.join(lines)}")


def saved_iteration(out_dir):
    """The iteration of out_dir's committed checkpoint (0 while there is none, or during its commit)."""
    try:
        with open(out_dir / "training_state" / "trainer_state.json") as f:
            return json.load(f)["iter_num"]
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def uninterrupted(char_data, tmp_path_factory):
    """The same run under `accelerate launch`, two processes: the reference."""
    out_dir = tmp_path_factory.mktemp("accelerate") / "out"
    result = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--main_process_port", free_port(), "--mixed_precision", "no", "--dynamo_backend", "no",
                             "train.py", f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN],
                            cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return losses(result.stdout), sha256(out_dir / "model.safetensors")


@pytest.fixture(scope="module")
def ray_installed():
    try:
        importlib.import_module("ray.train.torch")
    except ImportError as e:
        pytest.skip(f"Ray Train is not installed ({e}): pip install -r requirements-dev.txt")


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_restarted_by_ray_and_the_run_ends_as_under_accelerate_launch(
        ray_installed, char_data, tmp_path, uninterrupted):
    """Two Ray workers compute what two accelerate processes do; rank 1 killed after the first
    checkpoint, Ray starts the group again and it resumes from that checkpoint, exactly."""
    began = time.monotonic()
    run = ray_run(tmp_path, char_data, "--max-failures=2")
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(run.stdout), daemon=True)
    reader.start()
    try:
        while (killed_at := saved_iteration(tmp_path / "out")) < 50:
            assert run.poll() is None and time.monotonic() - began < 300, "".join(lines)
            time.sleep(0.02)
        os.kill(worker_pid(lines, rank=1), signal.SIGKILL)
        run.wait(timeout=600)
        reader.join(timeout=60)
        output = "".join(lines)
    finally:
        if run.poll() is None:
            for process in [*psutil.Process(run.pid).children(recursive=True), psutil.Process(run.pid)]:
                process.kill()
    assert run.returncode == 0, output
    expected_losses, expected_weights = uninterrupted
    first, _, restarted = output.partition("resuming from iteration")
    assert restarted, output  # Ray started the group again and it continued from the checkpoint
    assert {i: line for i, line in losses(first).items() if i < killed_at} == {
        i: expected_losses[i] for i in range(killed_at)}  # the first attempt: the accelerate run's losses
    resumed_from = int(restarted.split()[0])
    assert resumed_from >= killed_at and losses(restarted) == {
        i: expected_losses[i] for i in range(resumed_from, 300)}
    assert sha256(tmp_path / "out" / "model.safetensors") == expected_weights
    assert f"Ray Train's run ended: the model is in {tmp_path / 'out'}" in output
    print(f"killed after iteration {killed_at}, resumed from {resumed_from}: "
          f"{time.monotonic() - began:.0f} s in all")


@pytest.mark.slow
def test_a_workers_own_error_is_the_last_line_after_ray_gives_up(ray_installed, tmp_path):
    """A missing dataset stops each worker with gpt-train's one line; Ray logs the worker's failure
    its own way, then the launcher ends with that line, exit code 2."""
    missing = tmp_path / "nothing"
    result = subprocess.run([sys.executable, "-m", "gpt_train.ray_train", "--num-workers=2", "--max-failures=0",
                             f"--storage-path={tmp_path / 'ray'}", f"--data_dir={missing}",
                             f"--out_dir={tmp_path / 'out'}", *RUN], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: dataset folder {missing} not found: prepare it with"), result.stderr
    assert 'File "' + os.path.join(ROOT, "gpt_train", "train.py") not in result.stderr  # none of the loop's frames


def test_the_launchers_flags_are_dashed_and_the_rest_goes_to_train_py():
    ours, rest = ray_train.parse(["--num-workers=4", "--max-failures=-1", "configs/train_gpt2.py", "--max_iters=10"])
    assert (ours.num_workers, ours.max_failures, ours.use_gpu) == (4, -1, False)
    assert rest == ["configs/train_gpt2.py", "--max_iters=10", "--resume_from_checkpoint=True"]
    assert ray_train.parse(["--resume_from_checkpoint=False"])[1] == ["--resume_from_checkpoint=False"]


@pytest.mark.parametrize("argv, message", [
    (["--num-wokers=2"], "error: unknown launcher flag --num-wokers (python -m gpt_train.ray_train --help); "
                         "train.py's settings are --key=value"),
    (["--num-workers=0"], "error: --num-workers=0: give 1 or more"),
    (["--max_iter=3"], "error: unknown setting 'max_iter'"),
])
def test_a_mistyped_flag_or_setting_is_one_line_before_ray_starts(argv, message, capsys):
    assert one_line_error(ray_train.main, argv, capsys).startswith(message)


def test_without_ray_installed_the_launcher_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray imports
    assert one_line_error(ray_train.main, ["--num-workers=2"], capsys) == (
        "error: Ray Train is not installed (import of ray halted; None in sys.modules): "
        "pip install 'ray[train]==2.60.0'")


@pytest.mark.parametrize("flags, resources, short", [
    (["--num-workers=8", "--use-gpu"], {"CPU": 16.0}, "--num-workers=8 asks for 8 GPUs and this machine's Ray has 0"),
    (["--num-workers=4"], {"CPU": 2.0}, "--num-workers=4 asks for 4 CPUs and this machine's Ray has 2"),
    (["--num-workers=2", "--use-gpu"], {"CPU": 2.0, "GPU": 2.0}, None),
])
def test_what_does_not_fit_a_fixed_ray_is_named(flags, resources, short):
    assert ray_train.shortfall(ray_train.parse(flags)[0], resources) == short


@pytest.mark.slow
def test_asking_this_machines_ray_for_gpus_it_lacks_is_one_line_not_a_wait(ray_installed, tmp_path):
    """The docs' 8-GPU command on a machine without them: Ray would wait for the GPUs forever."""
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has GPUs")
    result = subprocess.run([sys.executable, "-m", "gpt_train.ray_train", "--num-workers=8", "--use-gpu",
                             f"--storage-path={tmp_path / 'ray'}", "configs/train_gpt2.py",
                             f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, env={**ENV, "RAY_ADDRESS": ""},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --num-workers=8 asks for 8 GPUs and this machine's Ray has 0: lower --num-workers or drop "
        "--use-gpu, or set RAY_ADDRESS to a cluster that has them"), result.stderr
    assert not (tmp_path / "out").exists()
