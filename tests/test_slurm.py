"""SLURM for real: Debian's slurm-wlm and munge, started here on one host (slurmctld and slurmd on
localhost, proctrack/linuxproc, task/none, the machine's CPUs), and accelerate_configs/slurm_requeue.sh
submitted with sbatch as a user submits it. A requeue after the first checkpoint (what pre-emption
does) must end in a save on the signal, a second start that resumes, and the uninterrupted weights.

.ci/run installs the packages (as root); without them, or where the daemons cannot start, the test
is skipped with the reason they gave.
"""
import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import ROOT, TINY_MODEL, free_port, sha256

pytestmark = pytest.mark.slow  # daemons and launched processes: the full suite only

RUN = [*(a for a in TINY_MODEL if a != "--device=cpu"), "--gradient_accumulation_steps=2", "--dropout=0.1",
       "--max_iters=600", "--eval_interval=100", "--eval_iters=2"]
LAUNCH = "torchrun --standalone --nproc_per_node=2"
MUNGE_SOCKET_DIR = "/run/munge"


def _missing(names):
    return [name for name in names if shutil.which(name) is None]


def _start_munge():
    """munged as the munge user (Debian's package made its key), unless one already answers."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    os.makedirs(MUNGE_SOCKET_DIR, exist_ok=True)
    shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
    started = subprocess.run(["runuser", "-u", "munge", "--", "munged"], capture_output=True, text=True)
    if started.returncode != 0 or subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        pytest.skip(f"munged did not start: {started.stderr.strip() or started.stdout.strip()}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-host cluster: the environment (SLURM_CONF) its commands need."""
    missing = _missing(["slurmctld", "slurmd", "sbatch", "munged"])
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found): .ci/run installs Debian's slurm-wlm "
                    "and munge as root")
    if os.geteuid() != 0:
        pytest.skip("slurmd and munged are started as root here, and this test runs as another user")
    _start_munge()
    home = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    conf = home / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=gpttrain", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "AuthType=auth/munge",
        f"StateSaveLocation={home}/state", f"SlurmdSpoolDir={home}/spool",
        f"SlurmctldPidFile={home}/slurmctld.pid", f"SlurmdPidFile={home}/slurmd.pid",
        f"SlurmctldLogFile={home}/slurmctld.log", f"SlurmdLogFile={home}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill", "MpiDefault=none", "ReturnToService=2",
        "JobRequeue=1", "KillWait=60",
        f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    (home / "state").mkdir()
    (home / "spool").mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for daemon in ("slurmctld", "slurmd"):
        started = subprocess.run([daemon], env=env, capture_output=True, text=True)
        if started.returncode != 0:
            pytest.skip(f"{daemon} did not start: {started.stderr.strip()}")
    deadline = time.monotonic() + 60
    while not node_idle(env):
        if time.monotonic() > deadline:
            logs = "".join((home / f"{d}.log").read_text()[-500:] for d in ("slurmctld", "slurmd"))
            pytest.skip(f"the node never became idle: {logs}")
        time.sleep(0.5)
    yield env
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)


def wait_for(condition, what, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.3)


def node_idle(env):
    return subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip() == "idle"


def text(path):
    return path.read_text() if path.exists() else ""


def job_state(env, job):
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    fields = dict(part.split("=", 1) for part in shown.split() if "=" in part)
    return fields.get("JobState"), fields.get("Reason")


@pytest.fixture(scope="module")
def job_env(slurm):
    return {**slurm, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "GPT_TRAIN_LAUNCH": LAUNCH}


@pytest.fixture(scope="module")
def uninterrupted(job_env, char_data, tmp_path_factory):
    """The weights of the same run, never stopped, under the same launcher."""
    whole = tmp_path_factory.mktemp("whole") / "out"
    reference = subprocess.run([*LAUNCH.split(), "train.py", f"--data_dir={char_data}", f"--out_dir={whole}", *RUN],
                               cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    return sha256(whole / "model.safetensors")


# pre-empted: SLURM signals every process of the job and requeues it; at the time limit,
# --signal=B:TERM@120 signals the batch script alone, which passes it on and requeues the job itself
# (scancel --batch --signal=TERM delivers exactly that signal, now instead of two minutes before the limit)
STOPS = {"pre-empted": lambda job: ["scontrol", "requeue", job],
         "time limit": lambda job: ["scancel", "--batch", "--signal=TERM", job]}


@pytest.mark.parametrize("stop", sorted(STOPS))
def test_a_stopped_job_saves_on_the_signal_is_requeued_and_ends_with_the_uninterrupted_weights(
        job_env, uninterrupted, char_data, tmp_path, stop):
    env = job_env
    out_dir, log = tmp_path / "out", tmp_path / "job.out"
    submitted = subprocess.run(["sbatch", "--parsable", f"--output={log}", "accelerate_configs/slurm_requeue.sh",
                                f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN], cwd=ROOT, env=env,
                               capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    wait_for(lambda: "iter 150:" in text(log), "the job training past its first checkpoint")
    subprocess.run(STOPS[stop](job), env=env, check=True)
    wait_for(lambda: job_state(env, job)[0] == "PENDING", "the job back in the queue")

    def ended():
        state, reason = job_state(env, job)
        if state == "PENDING" and node_idle(env):
            # SLURM holds a requeued job (its BeginTime) before it may start: now, for the test, but
            # only once the stopped instance has left the node and a second has passed: slurmd refuses
            # a credential made in the second it revoked the job's last one ("Job credential revoked")
            time.sleep(1.5)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)
            time.sleep(1)
        assert state in ("PENDING", "REQUEUED", "CONFIGURING", "RUNNING", "COMPLETING", "COMPLETED"), (
            state, reason, text(log)[-3000:])
        return state == "COMPLETED"

    wait_for(ended, "the requeued job's end", timeout=300)

    output = text(log)
    assert "gpt-train: job %s start 0" % job in output and "gpt-train: job %s start 1" % job in output, output
    stopped = [line for line in output.splitlines() if line.startswith("SIGTERM received: stopped after iteration")]
    assert len(stopped) == 1, output  # saved on the signal, once
    saved_at = int(stopped[0].split("iteration ")[1].split(";")[0]) + 1
    assert f"resuming from iteration {saved_at} " in output
    assert output.count("done: ") == 2 and "(iter 0 -> " in output and f"(iter {saved_at} -> 600)" in output
    assert sha256(out_dir / "model.safetensors") == uninterrupted
    if stop == "time limit":
        assert f"gpt-train: job {job} saved on SIGTERM; requeued to continue" in output
