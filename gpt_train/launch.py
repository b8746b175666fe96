"""What `accelerate launch` (torchrun) tells the processes it starts, read from the environment
in this one place: how many processes there are, the YAML's mixed precision, whether FSDP is on,
how often the workers were restarted; and the watch that stops a worker whose launcher died.

Free of torch, so the entry points' exit path (gpt_train.errors) can use it before anything
heavy is imported.
"""
import os
import sys
import threading
import time

LAUNCHER_POLL_S = 0.5  # how soon a worker notices its launcher is gone


def launched_processes():
    """How many processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def restart_attempt():
    """How often torchrun (--max_restarts) has restarted the worker group: 0 on the first start."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def agent_store():
    """(host, port, this process's rank) of the store torchrun's agent keeps for the processes it
    started, or None if there is no such store or processes on other machines share it."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or \
            os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        return None
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["RANK"])


def launched_with_fsdp():
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def launch_mixed_precision():
    """The mixed_precision of the YAML given to `accelerate launch`, or None without one."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or None


def stop_with_launcher():
    """In a process started by `accelerate launch` or torchrun, a watch that ends it at once when
    the launcher dies (kill -9 leaves its workers running with no parent): no checkpoint, as after
    a kill -9, so a relaunch never races orphans for out_dir. A run started from a shell is left
    alone (nohup must keep working)."""
    parent = os.getppid()
    if "TORCHELASTIC_RUN_ID" not in os.environ and not _is_accelerate_launch(parent):
        return
    threading.Thread(target=_watch, args=(parent,), name="launcher-watch", daemon=True).start()


def _is_accelerate_launch(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(os.path.basename(arg) == b"accelerate" for arg in argv) and b"launch" in argv


def _watch(parent):
    while os.getppid() == parent:
        time.sleep(LAUNCHER_POLL_S)
    try:
        os.write(sys.stderr.fileno(), f"error: the launcher (pid {parent}) is gone: this worker (pid {os.getpid()}) "
                 "stops now, without a checkpoint; continue with --init_from=resume\n".encode())
    except OSError:
        pass  # nobody may be reading any more
    os._exit(1)
