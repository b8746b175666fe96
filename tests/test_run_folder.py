"""The run folder under an adversary: hand-edited files, two writers, a killed launcher, full and
read-only disks, a closed pipe at Ctrl-C. Real processes, real signals, real file systems.

Each test names what a user would lose if it failed. A full or read-only disk is a real tmpfs,
mounted for the test where the machine lets the tests mount one (root on Linux), else skipped.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ACCELERATE, ROOT, TINY_MODEL, forget_the_run, free_port, one_line_error, tmpfs, tree_digest
from gpt_train import checkpoint
from gpt_train.commands import train as main
from gpt_train.cli import load_config
from gpt_train.convert import upgrade
from gpt_train.errors import UserError
from gpt_train.files import describe_write_failure
from gpt_train.out_dir import LOCK, METRICS, OLD_STATE_DIR, STATE_DIR, TRAINER_STATE, read_metrics
from gpt_train.plot import main as plot_main
from gpt_train.train import train

SHORT = [*TINY_MODEL, "--eval_interval=2", "--eval_iters=1"]
LONG = [*TINY_MODEL, "--max_iters=100000", "--eval_interval=5", "--eval_iters=1"]  # stopped by the test


def start(args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, text=True, bufsize=1,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}, **kwargs)


def wait_for(proc, prefix):
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"ended ({proc.wait()}) before '{prefix}':\n{''.join(lines)}")


def run_main(argv, capsys):
    """train.py's main in-process, ended by one error line: that line."""
    return one_line_error(main, argv, capsys)


@pytest.fixture(scope="module")
def finished(tiny_checkpoint):
    """A finished tiny run (checkpoint at iteration 4: SHORT to max_iters=4), copied by each test that changes one."""
    return tiny_checkpoint


@pytest.fixture
def run_copy(finished, char_data, tmp_path):
    out_dir = str(tmp_path / "out")
    shutil.copytree(finished, out_dir)
    return out_dir, [f"--data_dir={char_data}", f"--out_dir={out_dir}", *SHORT]


# ---- 1. deletes stay inside out_dir


def test_overwrite_deletes_only_gpt_train_files_inside_out_dir_whatever_the_folder_lists(run_copy, tmp_path,
                                                                                          capsys):
    out_dir, args = run_copy
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "thesis.txt").write_text("years of work")
    (tmp_path / "sibling.txt").write_text("keep me")
    (tmp_path / "out" / "notes.txt").write_text("the user's own notes")
    state_path = os.path.join(out_dir, STATE_DIR, TRAINER_STATE)
    with open(state_path) as f:
        state = json.load(f)
    for name in ("../sibling.txt", str(outside), "../precious/thesis.txt", "notes.txt"):  # a hand-edited manifest
        state["files"][name] = {"size": 1}
    with open(state_path, "w") as f:
        json.dump(state, f)
    os.remove(os.path.join(out_dir, "loss.png"))
    os.symlink(outside / "thesis.txt", os.path.join(out_dir, "loss.png"))  # gpt-train's names, pointing outside
    os.symlink(outside, os.path.join(out_dir, OLD_STATE_DIR))
    before = tree_digest(outside, tmp_path / "sibling.txt")

    train(load_config([*args, "--max_iters=2", "--overwrite_output_dir=True"]))
    assert tree_digest(outside, tmp_path / "sibling.txt") == before  # nothing outside out_dir changed
    assert (tmp_path / "out" / "notes.txt").read_text() == "the user's own notes"  # not a name gpt-train writes
    assert not os.path.islink(os.path.join(out_dir, "loss.png"))
    assert checkpoint.read_trainer_state(out_dir).iter_num == 2
    printed = capsys.readouterr().out
    assert f"overwrite_output_dir: removed the previous run in {out_dir}: " \
           "README.md, config.json, generation_config.json, loss.png, metrics.jsonl, model.safetensors, " \
           "tokenizer.json, tokenizer_config.json, training_config.json, training_state, training_state.old" in printed


def test_overwrite_of_a_folder_that_cannot_go_is_one_line(run_copy, capsys):
    """A name gpt-train writes that is a mount point (a disk mounted on out_dir/training_state)."""
    out_dir, args = run_copy
    with tmpfs(os.path.join(out_dir, STATE_DIR), "1m"):
        error = run_main([*args, "--max_iters=2", "--overwrite_output_dir=True"], capsys)
    assert error == (f"error: overwrite_output_dir: could not remove {os.path.join(out_dir, STATE_DIR)} (Device or "
                     "resource busy): remove or unmount it yourself, or choose another out_dir")


def test_a_manifest_naming_paths_outside_out_dir_is_refused_at_resume(run_copy, capsys):
    out_dir, args = run_copy
    state_path = os.path.join(out_dir, STATE_DIR, TRAINER_STATE)
    with open(state_path) as f:
        state = json.load(f)
    state["files"]["/etc/passwd"] = {"size": 1}
    with open(state_path, "w") as f:
        json.dump(state, f)
    error = run_main([*args, "--init_from=resume", "--max_iters=6"], capsys)
    assert "is corrupt (it lists '/etc/passwd', which is not a path inside out_dir)" in error


# ---- 2. one writer at a time


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_first_and_a_kill_9_frees_the_folder(char_data, tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    args = [f"--data_dir={char_data}", f"--out_dir={out_dir}"]
    first = start([*args, *LONG])
    try:
        wait_for(first, "saving checkpoint")
        for extra in ([], ["--init_from=resume"], ["--overwrite_output_dir=True"]):  # a new run, a resume, a replace
            error = run_main([*args, *SHORT, "--max_iters=50", *extra], capsys)
            assert error.startswith(f"error: {out_dir} is in use by another training run or gpt-train command (pid "
                                    f"{first.pid} on ")
            assert error.endswith("wait for it to end or stop it, or use another folder")
        wait_for(first, "saving checkpoint")  # the first run went on untouched
        wait_for(first, "iter ")  # its second save done
        with pytest.raises(UserError, match="is in use by another training run"):  # commands that write there too
            upgrade(out_dir)
    finally:
        first.kill()
        first.wait()
    # the operating system released the lock with the process: no stale lock blocks the resume
    assert os.path.exists(os.path.join(out_dir, LOCK))
    saved = checkpoint.read_trainer_state(out_dir).iter_num
    train(load_config([*args, *LONG, "--init_from=resume", f"--max_iters={saved + 2}"]))
    assert not os.path.exists(os.path.join(out_dir, LOCK))  # a run that ends removes it


@pytest.mark.slow
def test_two_runs_started_together_into_one_out_dir_one_trains_one_is_refused(char_data, tmp_path):
    out_dir = str(tmp_path / "out")
    procs = [start([f"--data_dir={char_data}", f"--out_dir={out_dir}", *SHORT, "--max_iters=40", "--eval_interval=20"])
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(out for code, out in results if code == 2)
    assert "is in use by another training run" in refused or "holds another training run" in refused, refused
    records = read_metrics(out_dir, "train")
    assert [r["iter"] for r in records] == list(range(40))  # one run's log, not two interleaved


# ---- 3. a killed launcher takes its workers with it


@pytest.mark.slow
def test_killing_the_launcher_with_sigkill_stops_its_workers_and_frees_out_dir(char_data, tmp_path):
    out_dir = str(tmp_path / "out")
    args = [f"--data_dir={char_data}", f"--out_dir={out_dir}", *LONG, "--gradient_accumulation_steps=2"]
    launcher = subprocess.Popen([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                                 free_port(), "train.py", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    wait_for(launcher, "saving checkpoint")
    wait_for(launcher, "iter ")  # the first checkpoint is committed
    workers = psutil.Process(launcher.pid).children(recursive=True)
    assert len(workers) == 2
    launcher.kill()
    launcher.wait()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    for orphan in alive:  # the failure is reported; the orphans must not outlive the test
        orphan.kill()
    assert not alive, "orphaned workers kept training into out_dir"
    # a relaunch is not refused, and continues from what the workers had saved
    saved = checkpoint.read_trainer_state(out_dir).iter_num
    train(load_config([*args, "--gradient_accumulation_steps=2", "--init_from=resume", f"--max_iters={saved + 1}"]))
    assert checkpoint.read_trainer_state(out_dir).iter_num == saved + 1


# ---- 4. a log is not a checkpoint


def test_a_torn_or_garbage_metrics_line_never_blocks_a_resume_or_a_plot(run_copy, tmp_path, capsys):
    out_dir, args = run_copy
    path = os.path.join(out_dir, METRICS)
    with open(path) as f:
        lines = f.readlines()
    lines.insert(2, "this line was edited by hand\n")
    with open(path, "w") as f:
        f.writelines(lines)
        f.write('{"event": "train", "iter": 5, "train/st')  # a full disk cut the last write short
    for leftover in ("loss.png.k2x9_q0a.tmp", "notes.txt.k2x9_q0a.tmp"):  # a chart's write killed half-way; a user's
        (tmp_path / "out" / leftover).write_bytes(b"half a file")
    train(load_config([*args, "--init_from=resume", "--max_iters=8"]))
    assert not os.path.exists(os.path.join(out_dir, "loss.png.k2x9_q0a.tmp"))
    assert os.path.exists(os.path.join(out_dir, "notes.txt.k2x9_q0a.tmp"))
    assert f"warning: {METRICS}'s last line was cut short" in capsys.readouterr().out
    evals = [r["iter"] for r in read_metrics(out_dir, "eval")]
    assert evals == [0, 2, 4, 6, 8]  # the evaluation at 4 once: the resumed run's replaces the first session's
    with open(path, "rb") as f:  # train 4-7 and evals 6, 8 added, each on a line of its own
        assert f.read().count(b"\n") == len(lines) + 4 + 2
    plot_main([out_dir])
    assert os.path.isfile(os.path.join(out_dir, "loss.png"))


# ---- 5. real write failures: one line, the last checkpoint intact


def checkpoint_files(out_dir):
    return tree_digest(os.path.join(out_dir, STATE_DIR), os.path.join(out_dir, "model.safetensors"))


def test_a_disk_that_fills_up_ends_in_one_line_and_keeps_the_last_checkpoint(char_data, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "700k") as disk:  # room for one checkpoint and the chart, not for a second
        out_dir = os.path.join(disk, "out")
        error = run_main([f"--data_dir={char_data}", f"--out_dir={out_dir}", *SHORT, "--max_iters=20"], capsys)
        assert error.startswith(f"error: could not write a checkpoint to {out_dir}: the disk is full")
        saved = checkpoint.read_trainer_state(out_dir).iter_num
        assert error.endswith(f"the last checkpoint in {out_dir}, at iteration {saved}, is intact; continue with "
                              "--init_from=resume")
        assert not os.path.exists(os.path.join(out_dir, checkpoint.STAGING_DIR))


def fill(disk):
    """Fill the file system of `disk` to the last byte."""
    with open(os.path.join(disk, "ballast"), "wb", buffering=0) as f:  # nothing left to flush at close
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
        try:
            while True:  # the last partial block
                f.write(b"\0")
                f.flush()
        except OSError:
            pass


def test_a_resume_or_a_new_run_on_a_full_disk_is_one_line_and_changes_nothing(finished, char_data, tmp_path,
                                                                              capsys):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out_dir = os.path.join(disk, "out")
        shutil.copytree(finished, out_dir)
        new = os.path.join(disk, "new")
        os.makedirs(new)
        fill(disk)
        before = tree_digest(out_dir)
        error = run_main([f"--data_dir={char_data}", f"--out_dir={out_dir}", *SHORT, "--init_from=resume",
                          "--max_iters=8"], capsys)
        assert error.startswith(f"error: cannot write to out_dir {out_dir}: the disk is full")
        assert error.endswith(f"the last checkpoint in {out_dir}, at iteration 4, is intact; continue with "
                              "--init_from=resume")
        assert tree_digest(out_dir) == before and not os.path.exists(os.path.join(out_dir, LOCK))
        error = run_main([f"--data_dir={char_data}", f"--out_dir={new}", *SHORT, "--max_iters=8"], capsys)
        assert error.startswith(f"error: cannot write to out_dir {new}: the disk is full") and os.listdir(new) == []


def test_running_a_finished_run_again_logs_each_evaluation_once_and_saves_nothing(finished, char_data, tmp_path,
                                                                                  capsys):
    out_dir = str(tmp_path / "out")
    shutil.copytree(finished, out_dir)
    weights = tree_digest(os.path.join(out_dir, "model.safetensors"))
    args = [f"--data_dir={char_data}", f"--out_dir={out_dir}", *SHORT, "--max_iters=4"]
    for _ in range(2):  # the quick start run twice more: --resume_from_checkpoint=True finds the finished run
        train(load_config([*args, "--resume_from_checkpoint=True"]))
        forget_the_run()
    assert "saving checkpoint" not in capsys.readouterr().out  # the same weights are on disk already
    assert tree_digest(os.path.join(out_dir, "model.safetensors")) == weights
    evals = [r["iter"] for r in read_metrics(out_dir, "eval")]
    assert evals == [0, 2, 4]


@pytest.mark.slow
def test_a_file_size_limit_ends_in_one_line_and_leaves_no_staging(char_data, tmp_path):
    out_dir = str(tmp_path / "out")
    limit = 150_000  # bytes: the optimizer state (~236 kB) is the first file to pass it

    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = start([f"--data_dir={char_data}", f"--out_dir={out_dir}", *SHORT, "--max_iters=4"],
                 preexec_fn=limit_files)
    output = proc.stdout.read()
    assert proc.wait() == 2 and "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write a checkpoint to {out_dir}: a file reached the size limit "
                           "(ulimit -f)"), output
    assert last.endswith(f"{out_dir} has no checkpoint yet; start the run again"), output
    assert not os.path.exists(os.path.join(out_dir, checkpoint.STAGING_DIR))


@pytest.mark.slow
def test_an_out_dir_that_turns_read_only_mid_run_ends_in_one_line(char_data, tmp_path):
    out_dir = str(tmp_path / "out")
    proc = start([f"--data_dir={char_data}", f"--out_dir={out_dir}", *LONG])
    try:
        wait_for(proc, "saving checkpoint")
        wait_for(proc, "iter 7:")
        # a read-only mount of out_dir over itself: what an admin or a failing disk does to a live run
        if subprocess.run(["mount", "--bind", out_dir, out_dir], capture_output=True).returncode != 0:
            pytest.skip("bind mounts need root on Linux")
        for _ in range(200):  # the remount is refused while the run has a file open for writing there
            os.kill(proc.pid, signal.SIGSTOP)
            if subprocess.run(["mount", "-o", "remount,bind,ro", out_dir], capture_output=True).returncode == 0:
                break
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.005)
        else:
            raise AssertionError(f"could not remount {out_dir} read-only")
        before, saved = checkpoint_files(out_dir), checkpoint.read_trainer_state(out_dir, repair=False).iter_num
        os.kill(proc.pid, signal.SIGCONT)
        rest = proc.stdout.read()
        assert proc.wait(timeout=120) == 2, rest
    finally:
        proc.kill()
        subprocess.run(["umount", "-l", out_dir], capture_output=True)
    last = rest.strip().splitlines()[-1]
    assert last.startswith("error: could not write ") and "the file system is read-only" in last, rest
    assert last.endswith(f"the last checkpoint in {out_dir}, at iteration {saved}, is intact; continue with "
                         "--init_from=resume") and "Traceback" not in rest
    assert checkpoint_files(out_dir) == before
    assert checkpoint.read_trainer_state(out_dir).iter_num == saved >= 5


@pytest.mark.parametrize("words, reason", [
    ("open file failed with strerror: Read-only file system", "the file system is read-only"),
    ("file write failed with strerror: No space left on device", "the disk is full"),
    ("unexpected pos 64 vs 0", None)])
def test_torch_write_errors_that_name_their_errno_only_in_words_are_explained(tmp_path, words, reason):
    # torch.save's error on a read-only mount carries no errno, and differs between builds (found in CI)
    error = RuntimeError(f"[enforce fail at inline_container.cc:747] . {words}")
    described = describe_write_failure(error, str(tmp_path))
    assert described.startswith(reason or "a write failed") and words in described


def test_a_new_run_into_a_read_only_folder_is_one_line(char_data, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        error = run_main([f"--data_dir={char_data}", f"--out_dir={disk}/out", *SHORT, "--max_iters=2"], capsys)
        assert error == (f"error: cannot create out_dir {disk}/out (Read-only file system): choose a folder you can "
                         "write to")


# ---- 6. every checkpoint file has a digest


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "scheduler.bin"])
def test_a_damaged_training_state_file_is_refused_by_name_before_anything_loads(run_copy, name, capsys):
    out_dir, args = run_copy
    path = os.path.join(out_dir, STATE_DIR, name)
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(os.urandom(size))  # garbage of the right size
    before = tree_digest(out_dir)
    error = run_main([*args, "--init_from=resume", "--max_iters=6"], capsys)
    assert error.startswith(f"error: the checkpoint in {out_dir} is damaged: {STATE_DIR}/{name} does not match "
                            "the file the checkpoint wrote (sha256 differs)")
    assert tree_digest(out_dir) == before


# ---- 9. Ctrl-C with nobody left to read the output


@pytest.mark.slow
def test_ctrl_c_under_a_closed_pipe_still_saves_and_says_which_weights_the_folder_holds(char_data, tmp_path):
    """`train.py ... | tee log` and Ctrl-C: the terminal's SIGINT ends tee too. The save happens;
    with always_save_checkpoint=False the card says the folder holds the last step, not the best."""
    out_dir = str(tmp_path / "out")
    proc = start([f"--data_dir={char_data}", f"--out_dir={out_dir}", *LONG, "--always_save_checkpoint=False",
                  "--eval_interval=10"])
    wait_for(proc, "iter 13:")
    proc.stdout.close()  # tee is gone
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    state = checkpoint.read_trainer_state(out_dir)
    assert state.iter_num >= 14 and state.stopped_by == "SIGINT" and state.val_loss is None
    assert state.best_iter == 10
    with open(os.path.join(out_dir, "README.md")) as f:
        card = f.read()
    assert f"| iteration | {state.iter_num:,} |" in card
    assert "| val loss of these weights | not evaluated: saved when the run was stopped (SIGINT) |" in card
    assert f", at iteration {state.best_iter} |" in card
