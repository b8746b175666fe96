"""benchmarks/gpu_checks.sh spends a device session of minutes: every benchmark it runs is
smoke-run here at toy size on CPU, with nanoGPT's own train.py where benchmarks/gpu_carry.sh has
put a checkout in .carry/nanoGPT (CI has none: those runs say skipped), and every step's command
line is checked against the scripts it calls."""
import os
import re
import shlex
import subprocess

import pytest

from benchmarks.side_by_side import CASES
from conftest import ROOT, run_script

NANOGPT = os.path.join(ROOT, ".carry", "nanoGPT")
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_checks.sh")
TOY = "--device=cpu --compile=False --n_layer=2 --n_embd=32 --n_head=2 --block_size=32 --batch_size=4"


def nanogpt():
    if not os.path.isdir(NANOGPT):
        pytest.skip("no nanoGPT checkout in .carry/ (benchmarks/gpu_carry.sh puts one there)")
    return f"--nanogpt={NANOGPT}"


def step_commands():
    """Each `step NAME LIMIT COMMAND...` of gpu_checks.sh, continuation lines joined."""
    with open(SCRIPT) as f:
        text = f.read().replace("\\\n", " ")
    return [shlex.split(line.split("step ", 1)[1].replace('"$NANOGPT"', "N").replace('"$OUT', '"OUT')
                        .replace('"$target"', "1.0"))[2:]
            for line in text.splitlines() if re.match(r"^(\[.*\] (&&|\|\|)\s+)?step \w+ \d+ ", line)]


def test_every_step_names_runs_and_options_its_script_has():
    commands = step_commands()
    assert len(commands) >= 10 and commands[0][0] == "bash"  # the data first
    for command in commands:
        if command[:2] != ["python3", "benchmarks/side_by_side.py"]:
            continue
        options = dict(arg[2:].split("=", 1) for arg in command[2:] if arg.startswith("--") and "=" in arg)
        names = [name for name, *_ in CASES[options["case"]]]
        for name in options.get("only", "").split(","):
            assert not name or name in names, (name, names)
    help_of = {}
    for command in commands:
        if command[0] == "python3" and command[1].startswith("benchmarks/"):
            script = command[1]
            if script not in help_of:
                help_of[script] = run_script(script, "--help").stdout
            for arg in command[2:]:
                if arg.startswith("--"):
                    assert arg.split("=")[0] in help_of[script], (script, arg)


@pytest.mark.slow
def test_the_script_keeps_its_budget_and_continues_from_a_step(tmp_path):
    """GPU_CHECKS_FROM=muon skips the steps before it; a budget of 29 s leaves no step its 30 s:
    the script still ends, having written what the device is (here: no nvidia-smi)."""
    names = re.findall(r"step (\w+) \d+ ", open(SCRIPT).read())
    env = {**os.environ, "GPU_CHECKS_BUDGET": "29", "GPU_CHECKS_FROM": "muon",
           "GPU_CHECKS_WHEELS": str(tmp_path / "no-wheels")}  # .carry's are the device's Python 3.12's
    result = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before = names[:names.index("muon")]
    assert before and all(f"=== {name}: skipped (GPU_CHECKS_FROM=muon)" in result.stdout for name in before
                          if name != "prepare")
    assert all(re.search(rf"=== {name}: skipped, \d+ s of the budget left", result.stdout)
               for name in names[names.index("muon"):] if name != "speedrun_seeds")  # no target: not started
    assert "=== done in" in result.stdout and os.path.isfile(tmp_path / "out" / "device.txt")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_side_by_side_runs_at_toy_size(case, bpe_data):
    extra = [nanogpt()] if any(side == "nanogpt" for _, side, _, _ in CASES[case]) else []
    result = run_script("benchmarks/side_by_side.py", f"--case={case}", "--small", f"--data={bpe_data}", "--iters=4",
                        "--warmup=1", *extra)
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and "ms/iter" not in line]
    assert len(table) == len(CASES[case]), result.stdout
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0 and float(cells[2].replace(",", "")) > 0, line


@pytest.mark.slow
def test_the_gpu_time_to_target_runs_at_toy_size(char_data):
    """nanoGPT's run at toy size is the target; the GPU speedrun preset at toy size is timed against it."""
    result = run_script("benchmarks/time_to_target.py", "--gpu", nanogpt(), "--skip_recipe", "--seeds=1",
                        f"--data={char_data}",
                        f"--baseline_extra={TOY} --max_iters=4 --lr_decay_iters=4 --eval_interval=2 --eval_iters=1 "
                        "--warmup_iters=1",
                        f"--extra={TOY} --max_iters=4 --lr_decay_iters=4 --warmup_iters=1 --eval_interval=4 "
                        "--eval_iters=1")
    assert re.search(r"^nanoGPT +1337 +[\d.]+ +[\d.]+$", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"target [\d.]+ met by \d/1", result.stdout) and "fast/nanoGPT wall ratio" in result.stdout


@pytest.mark.slow
def test_the_gpu_time_to_target_takes_a_given_target_without_nanogpt(char_data):
    result = run_script("benchmarks/time_to_target.py", "--gpu", "--target=9.0", "--skip_recipe", "--seeds=1",
                        f"--data={char_data}",
                        f"--extra={TOY} --max_iters=2 --lr_decay_iters=2 --warmup_iters=1 --eval_interval=2 "
                        "--eval_iters=1")
    assert "target 9.0000 met by 1/1" in result.stdout and "nanoGPT" not in result.stdout


@pytest.mark.slow
def test_the_plain_step_benchmark_runs_at_toy_size():
    result = run_script("benchmarks/gpu_gpt2.py", "--small=True", "--iters=2", "--warmup=1")
    assert "gpt-train/plain tokens/s ratio" in result.stdout and "MFU n/a" in result.stdout
