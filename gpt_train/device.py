"""Which device and precision a run uses: one policy for training and sampling.

    device  'auto': cuda, then mps, then cpu.  'cpu', 'cuda', 'mps'; 'cuda:N' for sampling (one
            process); a training run takes its GPUs from the launcher (CUDA_VISIBLE_DEVICES).
    dtype   'auto': bfloat16 on GPUs that support it, float16 (with loss scaling) on other GPUs,
            float32 on CPU and MPS; under `accelerate launch --config_file`, training leaves
            'auto' to the YAML's mixed_precision. An explicit dtype wins everywhere.

Not here: what a process does with them (gpt_train.train, gpt_train.sample), the launcher's
environment (gpt_train.launch).
"""
import datetime

import psutil
import torch

from gpt_train.errors import UserError
from gpt_train.launch import agent_store, launch_mixed_precision, launched_processes, restart_attempt

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}  # Accelerate's names


def resolve_device(name):
    """The torch.device `name` stands for on this machine, or a one-line error saying why not."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but no CUDA GPU is visible: use --device=cpu or --device=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={name!r} but MPS is not available: use --device=cpu or --device=auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}")
    return device


def process_group_kwargs(device_name, backend, timeout_s):
    """PartialState's arguments for a training process, after checking the device setting."""
    if device_name.startswith("cuda:"):
        raise UserError(f"device={device_name!r}: choose the GPU with CUDA_VISIBLE_DEVICES={device_name[5:]} and "
                        "--device=cuda (Accelerate places one process per GPU)")
    device = resolve_device(device_name)
    group = {"timeout": datetime.timedelta(seconds=timeout_s), **_restart_store(timeout_s)} \
        if launched_processes() > 1 else {}
    # Accelerate forms a CPU process group only when asked to: without this, processes launched on
    # a machine with no GPU would each train alone, all into the same out_dir.
    if device.type == "cpu":
        return {"cpu": True, **group}
    if device.type == "cuda" and launched_processes() > 1:
        return {"backend": backend, **group}
    return {}


def _restart_store(timeout_s):
    """A restarted worker group's own keys in the launcher's store.

    torchrun's static rendezvous keeps one store across restarts (--max_restarts) and the process
    group writes its keys without the attempt in them: a restarted process could read a dead
    one's address and fail to connect (gloo: Connection refused), using up the restarts. On one
    machine one agent restarts every process, so they agree on the attempt; across machines a node
    that comes back counts from 0 again, so the keys are left as torchrun makes them.
    """
    where = agent_store()
    if not restart_attempt() or where is None:
        return {}
    host, port, rank = where
    store = torch.distributed.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    return {"store": torch.distributed.PrefixStore(f"gpt-train/attempt-{restart_attempt()}", store),
            "rank": rank, "world_size": launched_processes()}


def check_one_run(state):
    """Processes a launcher started train together or not at all: never side by side into one out_dir."""
    if state.num_processes != launched_processes():
        raise UserError(f"{launched_processes()} processes were launched but they did not form one run "
                        f"({state.distributed_type} on {state.device.type}): launch several processes on "
                        "GPUs, or on CPUs with --device=cpu or ACCELERATE_USE_CPU=1")


# How gloo's TCP transport reports a peer that is gone, and one that is silent past the timeout;
# NCCL and the rendezvous store raise DistError.
LOST_PEER_MESSAGES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
SILENT_PEER_MESSAGES = ("Timed out waiting",)


def peer_failure(error, timeout_s):
    """Why a collective failed, in a few words, if another process of the run is gone or silent;
    None for any other error."""
    if any(m in str(error) for m in SILENT_PEER_MESSAGES):
        return f"no answer from the other processes within ddp_timeout={timeout_s}s (one hangs or its node is lost)"
    if isinstance(error, torch.distributed.DistError) or any(m in str(error) for m in LOST_PEER_MESSAGES):
        return "lost contact with the other processes (a process or node died)"
    return None


def torch_dtype(name, device):
    """The dtype for `name` on `device`; 'auto' is bfloat16 or float16 on GPUs, float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "float16" and device.type == "cpu":
        raise UserError("dtype='float16' is not supported on CPU: use bfloat16 or float32")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bfloat16: use --dtype=float16 (with loss scaling) or float32")
    return TORCH_DTYPES[name]


def mixed_precision(name, device):
    """Accelerate's mixed_precision for a training run; None leaves it to the launch YAML."""
    if name == "auto" and launch_mixed_precision():
        return None
    return MIXED_PRECISION[torch_dtype(name, device)]


def fsdp_compute_dtype(mixed):
    """The dtype FSDP computes in for a run's mixed precision (or the YAML's), None for float32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed or launch_mixed_precision() or "no")


def free_memory(device):
    """Bytes free on `device` for a run: CUDA's free memory, a CPU's available RAM (past it the
    kernel's OOM killer ends a run with no message); None where torch cannot say (MPS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return psutil.virtual_memory().available
    return None
