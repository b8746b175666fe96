"""What `accelerate launch` (torchrun) tells the processes it starts, read from the environment
in this one place: how many processes there are, the YAML's mixed precision, whether FSDP is on.

Free of torch, so the entry points' exit path (gpt_train.errors) can use it before anything
heavy is imported.
"""
import os


def launched_processes():
    """How many processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_with_fsdp():
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def launch_mixed_precision():
    """The mixed_precision of the YAML given to `accelerate launch`, or None without one."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or None
