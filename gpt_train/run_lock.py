"""One writer per out_dir: the training run holds an advisory lock on out_dir/.gpt-train.lock.

The lock is `flock`, which the operating system releases when the holder dies, so a kill -9
never leaves a stale lock behind; the file itself only says who holds it (pid, host, start)
for the refusal. Under `accelerate launch` the main process holds it for the run (the other
processes learn the outcome from it), and a restart under --max_restarts takes it over once
the dead attempt's processes are gone. gpt-eval and `convert upgrade`, which write into a model
folder, take it too; readers (sample.py, push, convert to-nanogpt, an eval_only run) never do:
a checkpoint is committed by renames, so they never see half of one.

Not here: what the holder writes (gpt_train.checkpoint).
"""
import datetime
import fcntl
import os
import socket
import time

from gpt_train.errors import UserError
from gpt_train.files import describe_write_failure
from gpt_train.launch import restart_attempt
from gpt_train.out_dir import LOCK, last_checkpoint_note

RESTART_WAIT_S = 60  # a restarted worker group waits this long for the dead attempt's main process to go
_held = {}  # real path of out_dir -> its OutDirLock, for the locks this process holds


class OutDirLock:
    """The held lock; `release` (or the process's end) frees it. Taken again by the process
    that holds it (lm-eval writing its scores during a run), it is counted, not refused."""

    def __init__(self, out_dir, fd, created_dir):
        self.out_dir, self.fd, self.created_dir = out_dir, fd, created_dir
        self.holds = 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        """Remove the lock file while still holding it, then let go; out_dir too if it was made
        for this run and nothing else was written there."""
        self.holds -= 1
        if self.holds or self.fd is None:
            return
        _held.pop(os.path.realpath(self.out_dir), None)
        path = os.path.join(self.out_dir, LOCK)
        try:
            os.remove(path)
            if self.created_dir:
                os.rmdir(self.out_dir)  # fails, as it should, unless empty
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def hold(out_dir):
    """Take out_dir's lock for this process, or a one-line UserError naming the run that has it."""
    if os.path.realpath(out_dir) in _held:
        held = _held[os.path.realpath(out_dir)]
        held.holds += 1
        return held
    created_dir = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create out_dir {out_dir} ({e.strerror}): choose a folder you can write to") from None
    path = os.path.join(out_dir, LOCK)
    deadline = time.monotonic() + (RESTART_WAIT_S if restart_attempt() else 0)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write to out_dir {out_dir} ({e.strerror}): choose a folder you can write "
                            "to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            raise UserError(f"{out_dir} is in use by another training run or gpt-train command ({holder}): wait "
                            "for it to end or stop it, or use another folder") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed this file as it let go: lock the one now there
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode())
    except OSError as e:  # a full disk, a quota: the run could write nothing either, so it stops here
        OutDirLock(out_dir, fd, created_dir).release()
        raise UserError(f"cannot write to out_dir {out_dir}: {describe_write_failure(e, out_dir) or e.strerror}; "
                        f"{last_checkpoint_note(out_dir)}") from None
    _held[os.path.realpath(out_dir)] = OutDirLock(out_dir, fd, created_dir)
    return _held[os.path.realpath(out_dir)]


def _same_file(fd, path):
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd):
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has just started"
