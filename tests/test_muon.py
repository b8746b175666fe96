"""optimizer='muon' and lr_schedule='wsd': which tensors each optimizer trains, exact resume after a
kill, DDP equal to one process, FSDP refused in one line, and model folders as plain as ever."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import pipeline

from conftest import ACCELERATE, ROOT, TINY_MODEL, free_port, read_metrics, run_script, sha256, torch_threads
from gpt_train.cli import load_config
from gpt_train.errors import UserError
from gpt_train.optim import Float32Muon, lr_multiplier
from gpt_train.train import setup, train

MUON = ["--optimizer=muon", "--muon_learning_rate=0.01", "--weight_decay=0.1"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
RUN = [*TINY_MODEL, *MUON, "--gradient_accumulation_steps=1", "--eval_interval=10", "--eval_iters=2",
       "--max_iters=30", "--dropout=0.1"]


def test_muon_trains_the_blocks_matrices_and_adamw_the_rest(char_data, tmp_path):
    run = setup(load_config([f"--data_dir={char_data}", f"--out_dir={tmp_path}", *TINY_MODEL, *MUON,
                             "--bias=True", "--learning_rate=3e-3", "--beta2=0.98", "--muon_momentum=0.9"]))
    adamw, muon = run.optimizers
    model = run.accelerator.unwrap_model(run.model)
    names = {id(p): name for name, p in model.named_parameters()}
    muon_names = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    assert muon_names == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    decay, no_decay = adamw.param_groups
    assert {names[id(p)] for p in decay["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(names[id(p)].endswith((".bias", "ln_1.weight", "ln_2.weight", "ln_f.weight"))
               for p in no_decay["params"])
    assert len(muon_names) + len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"], muon.param_groups[0]["weight_decay"]) == (0.1, 0.0, 0.1)
    assert decay["betas"] == (0.9, 0.98) and muon.param_groups[0]["momentum"] == 0.9
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"  # Conv1D's transposed layout changes nothing
    # the warmup's first step of each peak rate
    assert decay["lr"] == pytest.approx(3e-3 / 6) and muon.param_groups[0]["lr"] == pytest.approx(0.01 / 6)
    assert isinstance(muon.optimizer, torch.optim.Muon) and isinstance(adamw.optimizer, torch.optim.AdamW)


def test_float32_muon_runs_its_own_newton_schulz_in_float32(monkeypatch):
    """The CPU Muon swaps a private torch function during step(): if a torch upgrade stopped
    looking it up there, the swap would do nothing and CPU runs would quietly fall back to
    bfloat16 Newton-Schulz (10x slower); this fails first."""
    from gpt_train import optim
    calls = []

    def counted(grad, *args, **kwargs):
        out = optim_newton_schulz(grad, *args, **kwargs)
        calls.append(out.dtype)
        return out

    optim_newton_schulz = optim._newton_schulz_float32
    monkeypatch.setattr(optim, "_newton_schulz_float32", counted)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 8))
    opt = Float32Muon([weight], lr=0.01, adjust_lr_fn="match_rms_adamw")
    weight.grad = torch.randn(16, 8)
    before = weight.detach().clone()
    opt.step()
    assert calls == [torch.float32] and not torch.equal(weight.detach(), before)
    assert torch.optim._muon._zeropower_via_newtonschulz is not counted  # torch's own is back after the step


def test_the_speedrun_preset_is_what_the_readme_says(char_data, tmp_path):
    run = setup(load_config([os.path.join(ROOT, "configs", "speedrun_shakespeare_char_cpu.py"),
                             f"--data_dir={char_data}", f"--out_dir={tmp_path}", "--device=cpu"]))
    cfg = run.cfg
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size) == (4, 4, 128, 64, 12)
    assert (cfg.max_iters, cfg.eval_interval, cfg.compile, cfg.lr_schedule) == (500, 500, False, "cosine")
    adamw, muon = run.optimizers
    assert isinstance(muon.optimizer, Float32Muon)  # on a CPU
    assert len(muon.param_groups[0]["params"]) == 16  # 4 matrices in each of 4 blocks
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0] and muon.param_groups[0]["weight_decay"] == 0.1
    factor = lr_multiplier(cfg)
    peaks = (3e-3, 1e-2)
    for it, expected in ((0, 1 / 51), (49, 50 / 51), (50, 1.0), (275, 0.55), (500, 0.1)):
        assert factor(it) == pytest.approx(expected), it
    assert [adamw.param_groups[0]["lr"], muon.param_groups[0]["lr"]] == pytest.approx([p / 51 for p in peaks])


@pytest.mark.slow
def test_the_time_to_target_benchmark_runs(char_data):
    result = run_script("benchmarks/time_to_target.py", "--skip_recipe", "--seeds=1", f"--data={char_data}",
                        "--extra=--max_iters=5 --lr_decay_iters=5 --warmup_iters=1 --eval_interval=5 --eval_iters=1")
    assert "target 1.9021 met by 0/1" in result.stdout and "fast         1" in result.stdout


def test_float32_muon_is_torchs_muon_up_to_bfloat16_rounding():
    torch.manual_seed(0)
    weight, grad = torch.randn(64, 256), torch.randn(64, 256)
    updates = []
    torch_newton_schulz = torch.optim._muon._zeropower_via_newtonschulz
    for cls in (torch.optim.Muon, Float32Muon):
        p = torch.nn.Parameter(weight.clone())
        optimizer = cls([p], lr=0.02, adjust_lr_fn="match_rms_adamw")
        for _ in range(2):  # the second step goes through the momentum buffer too
            p.grad = grad.clone()
            optimizer.step()
        updates.append((p - weight).detach())
    ours, theirs = updates[1], updates[0]
    assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) > 0.999
    assert (ours - theirs).norm() / theirs.norm() < 0.02  # bfloat16 has 8 bits of mantissa
    assert torch.optim._muon._zeropower_via_newtonschulz is torch_newton_schulz  # restored after each step


def test_muon_learns_and_leaves_a_plain_gpt2_folder(tiny_run):
    out_dir, args = tiny_run
    train(load_config([*args, *MUON, "--max_iters=40", "--eval_interval=20", "--eval_iters=4"]))
    evals = read_metrics(out_dir, "eval")
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.8
    generator = pipeline("text-generation", model=out_dir)
    assert generator("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("ROMEO:")


@pytest.mark.slow
def test_muon_resumes_exactly_after_a_kill(char_data, tmp_path, capsys):
    straight_dir, out_dir = str(tmp_path / "straight"), str(tmp_path / "out")
    with torch_threads(1):  # the reference, in process
        train(load_config([f"--data_dir={char_data}", f"--out_dir={straight_dir}", *RUN]))
    straight = capsys.readouterr().out
    args = [f"--data_dir={char_data}", f"--out_dir={out_dir}", *RUN]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 13:") and any("saving" in seen for seen in lines):
            break
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    resumed = run_script("train.py", *args, "--init_from=resume", env=ONE_THREAD)
    losses = {line.split(",")[0] for line in resumed.stdout.splitlines() if line.startswith("iter ")}
    expected = {line.split(",")[0] for line in straight.splitlines() if line.startswith("iter ")}
    assert losses and losses <= expected
    assert sha256(os.path.join(out_dir, "model.safetensors")) == sha256(os.path.join(straight_dir, "model.safetensors"))


@pytest.mark.slow
def test_muon_on_two_ddp_processes_matches_one_process(tiny_run, tmp_path):
    out_dir, args = tiny_run
    common = [*args, *MUON, "--gradient_accumulation_steps=2", "--max_iters=6", "--eval_interval=3", "--eval_iters=2"]
    run_script(ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port(),
               "train.py", *common, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    one_dir = str(tmp_path / "one")
    with torch_threads(1):
        train(load_config([*common, f"--out_dir={one_dir}"]))
    for a, b in zip(read_metrics(out_dir, "train"), read_metrics(one_dir, "train"), strict=True):
        assert abs(a["train/step_loss"] - b["train/step_loss"]) < 1e-4
    two_weights, one_weights = load_file(os.path.join(out_dir, "model.safetensors")), load_file(
        os.path.join(one_dir, "model.safetensors"))
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_muon_under_fsdp_is_refused_in_one_line(tiny_run):
    _, args = tiny_run
    result = run_script(ACCELERATE, "launch", "--config_file", "accelerate_configs/fsdp_8xa100.yaml", "--num_processes",
                        "2", "--main_process_port", free_port(), "tests/fsdp_cpu_launch.py", *args, *MUON,
                        "--gradient_accumulation_steps=2", check=False,
                        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and errors and all(e == errors[0] for e in errors)
    assert errors[0].startswith("error: optimizer='muon' does not run under FSDP")


@pytest.mark.parametrize("argv, message", [
    (["--optimizer=lion"], "optimizer must be one of adamw, adamw_8bit, muon, got 'lion'"),
    (["--lr_schedule=linear"], "lr_schedule must be one of cosine, wsd, got 'linear'"),
    (["--lr_schedule=wsd", "--warmup_iters=10", "--lr_decay_iters=100", "--cooldown_iters=95"],
     "cooldown_iters (95) does not fit between warmup_iters (10) and lr_decay_iters (100)"),
    (["--optimizer=muon", "--dtype=float16"], "optimizer='muon' with float16 loss scaling is not supported"),
    (["--muon_momentum=1.0"], "muon_momentum must be in [0, 1)"),
])
def test_impossible_optimizer_settings_are_one_line(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(argv)


def test_a_resume_cannot_switch_the_optimizer(tiny_run):
    out_dir, args = tiny_run
    train(load_config([*args, "--max_iters=2", "--eval_interval=2", "--eval_iters=1"]))
    with pytest.raises(UserError, match="trains with optimizer='adamw'; a resume cannot change it"):
        train(load_config([f"--out_dir={out_dir}", "--init_from=resume", "--optimizer=muon", "--max_iters=4"]))


def test_wsd_warms_up_holds_then_cools_down_linearly_to_min_lr():
    cfg = load_config(["--lr_schedule=wsd", "--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=10",
                       "--lr_decay_iters=100", "--cooldown_iters=30"])
    f = lr_multiplier(cfg)
    assert [f(i) for i in (0, 9)] == [pytest.approx(1 / 11), pytest.approx(10 / 11)]
    assert f(10) == f(50) == f(69) == 1.0
    assert f(70) == pytest.approx(1.0) and f(85) == pytest.approx(0.55) and f(99) == pytest.approx(0.13)
    assert f(100) == f(1000) == pytest.approx(0.1)


@pytest.mark.slow
def test_help_and_print_config_name_the_new_settings():
    help_text = run_script("train.py", "--help").stdout
    for name in ("--optimizer='adamw'", "--muon_learning_rate=0.02", "--lr_schedule='cosine'", "--cooldown_iters=0"):
        assert name in help_text, name
    printed = run_script("train.py", "configs/speedrun_shakespeare_char_cpu.py", "--print_config").stdout
    assert "optimizer = " in printed and "lr_schedule = " in printed
