"""Run a Python script as `python SCRIPT ARGS...` would, then print the peak GPU memory torch
allocated in it (`peak_memory_bytes N`, on CUDA only): the same yardstick for gpt-train's and
nanoGPT's train.py.

    python benchmarks/peak_memory.py train.py configs/finetune_shakespeare.py ...
"""
import atexit
import os
import runpy
import sys


def report():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"peak_memory_bytes {torch.cuda.max_memory_allocated()}", flush=True)


if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # the script's own imports (nanoGPT's model.py)
    atexit.register(report)
    runpy.run_path(script, run_name="__main__")
