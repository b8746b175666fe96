"""What `accelerate launch` (torchrun) tells the processes it starts, read from the environment
in this one place: how many processes there are, the YAML's mixed precision, whether FSDP is on,
how often the workers were restarted.

Free of torch, so the entry points' exit path (gpt_train.errors) can use it before anything
heavy is imported.
"""
import os


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
