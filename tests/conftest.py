"""Shared fixtures: the real Shakespeare data prepared once, tiny model settings, CLI runners."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A GPT-2 small enough that a training step takes milliseconds on one CPU core.
TINY_MODEL = ["--gradient_accumulation_steps=1", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
              "--device=cpu", "--compile=False", "--dropout=0.0", "--log_interval=1",
              "--learning_rate=3e-3", "--warmup_iters=5", "--min_lr=3e-4", "--beta2=0.99"]


def run_script(*args, env=None, check=True):
    """Run a repo script (or `-m module`) as a user would, from the repo root."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def read_metrics(out_dir, event):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["event"] == event]


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """data/shakespeare_char as data_prep writes it, in a temporary folder."""
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    run_script("data_prep/shakespeare_char/prepare.py", f"--out_dir={out}")
    return str(out)


@pytest.fixture
def tiny_run(char_data, tmp_path):
    """Arguments for a tiny char-level training run into a fresh out_dir."""
    out_dir = str(tmp_path / "out")
    return out_dir, [f"--data_dir={char_data}", f"--out_dir={out_dir}", *TINY_MODEL]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """In-process runs must not inherit the previous test's Accelerator singleton."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
