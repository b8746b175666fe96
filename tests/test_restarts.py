"""Self-healing runs: torchrun restarts a killed worker and the run continues by itself; a lost
node stops the others with one line. Every kill is a real SIGKILL to a real launched process.

Two processes on one machine and one process on each of two "nodes" (two launchers on one
machine) run the same computation, so one uninterrupted two-node run is the reference for both.
"""
import os
import shutil
import signal
import subprocess
import threading
import time

import psutil
import pytest

from conftest import ACCELERATE, ROOT, TINY_MODEL, free_port, read_metrics, sha256
from gpt_train import checkpoint
from gpt_train.commands import train as main

pytestmark = pytest.mark.slow  # launched processes or lm-eval's task index: the full suite only

ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": ROOT}
# The README's way: no --device, the launcher's environment decides. Dropout on, so an exact
# resume also proves every RNG was restored.
RUN = [*(a for a in TINY_MODEL if a != "--device=cpu"), "--gradient_accumulation_steps=2", "--dropout=0.1",
       "--eval_interval=10", "--eval_iters=2", "--max_iters=30"]
LOST = "error: lost contact with the other processes (a process or node died): "


def launch(launcher_args, train_args):
    return subprocess.Popen([ACCELERATE, "launch", *launcher_args, "train.py", *train_args], cwd=ROOT, env=ENV,
                            text=True, bufsize=1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def node_args(rank, port):
    return ["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def two_nodes(train_args):
    port = free_port()
    return launch(node_args(0, port), train_args), launch(node_args(1, port), train_args)


def finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hung run must not outlive the test: its workers have their own group
        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            process.kill()
        raise
    return proc.returncode, out


def read_until(proc, first_line, lines):
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(first_line):
            return
    raise AssertionError(f"ended ({proc.wait()}) before {first_line!r}:\n{''.join(lines)}")


def drain(proc):
    """Keep reading a process's output so it never blocks on a full pipe; the lines, as they come."""
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


def worker(launcher, rank):
    """The training process torchrun started for global rank `rank` under `launcher`."""
    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no worker with RANK={rank} under launcher {launcher.pid}")


def losses(output):
    """{iteration: 'iter N: loss X'} as printed (the last print of each iteration), timing cut off."""
    return {int(line.split()[1].rstrip(":")): line.split(",")[0]
            for line in output.splitlines() if line.startswith("iter ")}


@pytest.fixture(scope="module")
def uninterrupted(char_data, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("uninterrupted") / "out")
    node0, node1 = two_nodes([f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN])
    (code0, out0), (code1, out1) = finish(node0), finish(node1)
    assert code0 == code1 == 0, out0 + out1
    assert "2 process(es) on cpu" in out0
    return losses(out0), sha256(os.path.join(out_dir, "model.safetensors"))


@pytest.mark.parametrize("kill_after, rank, resumed_from", [(15, 1, 10), (5, 0, None)],
                         ids=["after the first checkpoint", "before the first checkpoint"])
def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_if_uninterrupted(
        char_data, tmp_path, uninterrupted, kill_after, rank, resumed_from):
    out_dir = str(tmp_path / "out")
    proc = launch(["--multi_gpu", "--num_processes", "2", "--main_process_port", free_port(), "--max_restarts=3"],
                  [f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN, "--resume_from_checkpoint=True"])
    lines = []
    read_until(proc, f"iter {kill_after}:", lines)
    os.kill(worker(proc, rank).pid, signal.SIGKILL)
    code, rest = finish(proc)
    output = "".join(lines) + rest
    assert code == 0, output

    expected_losses, expected_weights = uninterrupted
    assert sha256(os.path.join(out_dir, "model.safetensors")) == expected_weights
    after_restart = output.split("failed (exitcode")[-1]
    assert losses(after_restart) == {i: expected_losses[i] for i in range(resumed_from or 0, 30)}
    assert output.count("failed (exitcode") == 1  # the first restart succeeded: no attempt was wasted
    if resumed_from:
        assert f"resuming from iteration {resumed_from} (best val" in after_restart
        assert f"{LOST}the last checkpoint in {out_dir}, at iteration {resumed_from}, is intact" in output
    else:  # nothing to resume: the restart starts the run again, in place of its first attempt
        assert "resuming" not in output
        assert [r["iter"] for r in read_metrics(out_dir, "train")] == list(range(30))
        assert f"{LOST}{out_dir} has no checkpoint yet; start the run again" in output


TORCHRUN = os.path.join(os.path.dirname(ACCELERATE), "torchrun")
PLAIN_ENV = {k: v for k, v in ENV.items() if not k.startswith("ACCELERATE_")}  # torchrun alone, as nanoGPT runs


def torchrun(launcher_args, train_args):
    return subprocess.Popen([TORCHRUN, *launcher_args, "train.py", *train_args], cwd=ROOT, env=PLAIN_ENV, text=True,
                            bufsize=1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_plain_torchrun_trains_as_accelerate_launch_does(char_data, tmp_path, uninterrupted):
    """nanoGPT's own command, `torchrun --standalone --nproc_per_node=N train.py config`, with no
    Accelerate launcher: the same losses and byte-identical weights."""
    out_dir = str(tmp_path / "out")
    code, out = finish(torchrun(["--standalone", "--nproc_per_node=2"],
                                [f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN]))
    assert code == 0, out
    assert "2 process(es) on cpu" in out and out.count("tokens per iteration will be") == 1
    expected_losses, expected_weights = uninterrupted
    assert losses(out) == expected_losses
    assert sha256(os.path.join(out_dir, "model.safetensors")) == expected_weights


def test_torchruns_elastic_agent_restarts_a_killed_worker_and_the_run_ends_as_if_uninterrupted(
        char_data, tmp_path, uninterrupted):
    """torchrun's elastic form (c10d rendezvous, --max-restarts): a worker killed after the first
    checkpoint; the group restarts and resumes from it by itself."""
    out_dir = str(tmp_path / "out")
    proc = torchrun(["--nnodes=1:2", "--nproc_per_node=2", "--max-restarts=3", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=elastic-test"],
                    [f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN, "--resume_from_checkpoint=True"])
    lines = []
    read_until(proc, "iter 15:", lines)
    os.kill(worker(proc, 1).pid, signal.SIGKILL)
    code, rest = finish(proc)
    output = "".join(lines) + rest
    assert code == 0, output
    after_restart = output.split("failed (exitcode")[-1]
    assert "resuming from iteration 10 (best val" in after_restart
    expected_losses, expected_weights = uninterrupted
    assert losses(after_restart) == {i: expected_losses[i] for i in range(10, 30)}
    assert sha256(os.path.join(out_dir, "model.safetensors")) == expected_weights


def test_a_lost_node_stops_the_other_in_seconds_with_one_line_and_both_resume_exactly(char_data, tmp_path,
                                                                                        uninterrupted):
    out_dir = str(tmp_path / "out")
    args = [f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN]
    node0, node1 = two_nodes(args)
    drain(node1)
    lines = []
    read_until(node0, "iter 15:", lines)
    # a lost machine: its launcher and its worker die together (torchrun gives the worker its own
    # process group, so killing the launcher alone would leave the worker running)
    lost = [worker(node1, 1), psutil.Process(node1.pid)]
    for process in lost:
        process.kill()
    killed = time.monotonic()
    code, rest = finish(node0, timeout=120)
    stopped_after = time.monotonic() - killed
    node1.wait()
    assert code != 0
    assert stopped_after < 10, f"node 0 took {stopped_after:.1f} s to stop"
    output = "".join(lines) + rest
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [f"{LOST}the last checkpoint in {out_dir}, at iteration 10, is intact; continue with "
                      "--init_from=resume"]
    assert "[rank0]" not in output and "RuntimeError" not in output  # no worker traceback (the launcher has its own)
    assert checkpoint.read_trainer_state(out_dir).iter_num == 10

    node0, node1 = two_nodes([*args, "--init_from=resume"])
    (code0, out0), (code1, out1) = finish(node0), finish(node1)
    assert code0 == code1 == 0, out0 + out1
    assert "resuming from iteration 10" in out0
    expected_losses, expected_weights = uninterrupted
    assert losses(out0) == {i: expected_losses[i] for i in range(10, 30)}
    assert sha256(os.path.join(out_dir, "model.safetensors")) == expected_weights


def test_resume_from_checkpoint_true_starts_when_there_is_nothing_to_resume_and_resumes_when_there_is(tiny_run,
                                                                                                          capsys):
    out_dir, args = tiny_run
    main([*args, "--max_iters=6", "--eval_interval=3", "--eval_iters=2", "--resume_from_checkpoint"])
    assert "resuming" not in capsys.readouterr().out
    main([*args, "--max_iters=9", "--eval_interval=3", "--eval_iters=2", "--resume_from_checkpoint=True"])
    out = capsys.readouterr().out
    assert "resume changes max_iters: 6 -> 9" in out and "resuming from iteration 6" in out
    assert checkpoint.read_trainer_state(out_dir).iter_num == 9


def test_resume_from_checkpoint_with_a_folder_continues_the_run_in_that_folder(tiny_run, tmp_path, capsys):
    out_dir, args = tiny_run
    main([*args, "--max_iters=6", "--eval_interval=3", "--eval_iters=2"])
    elsewhere = str(tmp_path / "elsewhere")
    main([*args, "--max_iters=9", "--eval_interval=3", "--eval_iters=2", f"--resume_from_checkpoint={out_dir}", f"--out_dir={elsewhere}"])
    assert "resuming from iteration 6" in capsys.readouterr().out
    assert checkpoint.read_trainer_state(out_dir).iter_num == 9 and not os.path.exists(elsewhere)


def one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_a_restart_never_replaces_a_model_it_cannot_resume(tiny_run, capsys):
    """Without a checkpoint, only what a first attempt leaves (settings, metrics, chart) is replaced."""
    out_dir, args = tiny_run
    main([*args, "--max_iters=3", "--eval_interval=3", "--eval_iters=2"])
    shutil.rmtree(os.path.join(out_dir, "training_state"))  # the model stays, its training state is gone
    before = sha256(os.path.join(out_dir, "model.safetensors"))
    assert one_line_error([*args, "--resume_from_checkpoint=True"], capsys).startswith(
        f"error: {out_dir} holds another training run")
    assert sha256(os.path.join(out_dir, "model.safetensors")) == before


def test_resume_from_checkpoint_names_a_folder_without_a_checkpoint_in_one_line(tiny_run, capsys):
    _, args = tiny_run
    for value in ("missing", 1.5):  # a bare number on the command line is a folder's name too
        assert one_line_error([*args, f"--resume_from_checkpoint={value}"], capsys).startswith(
            f"error: resume_from_checkpoint='{value}': no checkpoint there to continue")


def test_a_silent_process_stops_the_others_at_ddp_timeout_with_one_line(char_data, tmp_path):
    """A hung peer (here: stopped with SIGSTOP) is noticed only at the timeout, as NCCL notices a dead one."""
    out_dir = str(tmp_path / "out")
    proc = launch(["--multi_gpu", "--num_processes", "2", "--main_process_port", free_port()],
                  [f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN, "--ddp_timeout=3"])
    lines = []
    read_until(proc, "iter 15:", lines)
    silent = worker(proc, 1)
    silent.suspend()
    stopped = time.monotonic()
    read_until(proc, "error:", lines)
    waited = time.monotonic() - stopped
    silent.kill()  # a stopped process would make torchrun wait 30 s before it kills it
    finish(proc)
    assert 3 <= waited < 10, f"{waited:.1f} s"
    assert lines[-1] == ("error: no answer from the other processes within ddp_timeout=3s (one hangs or its node is "
                         f"lost): the last checkpoint in {out_dir}, at iteration 10, is intact; continue with "
                         "--init_from=resume\n")
