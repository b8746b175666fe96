"""Seeing progress: ETA on the log line, eval bars on terminals only, the summary, loss.png and plot."""
import json
import os
import re
import sys

import pytest

from conftest import read_metrics, run_script
from gpt_train import plot as plot_module
from gpt_train import progress as progress_module
from gpt_train.cli import load_config
from gpt_train.plot import CurvesReader, LivePlot
from gpt_train.progress import Progress, bar, format_duration
from gpt_train.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeAccelerator:
    is_main_process = True
    def __init__(self):
        self.printed = []

    def print(self, *args):
        self.printed.append(" ".join(map(str, args)))


def test_training_shows_eta_a_summary_and_redraws_loss_png(tiny_run, capsys):
    out_dir, args = tiny_run
    train(load_config([*args, "--max_iters=20", "--eval_interval=10", "--eval_iters=2", "--log_interval=5",
                              "--gradient_accumulation_steps=2"]))
    printed = capsys.readouterr().out
    iter_lines = [l for l in printed.splitlines() if l.startswith("iter ")]
    assert "ETA" not in iter_lines[0]  # no rate yet: the first step carries compilation and the first eval
    assert all(re.search(r", \d+\.\d\d (it/s|s/it), ETA \d+[smhd]", l) for l in iter_lines[1:]), iter_lines
    assert re.search(r"iter 15: .* ETA \d+s$", printed, re.M)  # 4 iterations left: seconds, not minutes
    evals = read_metrics(out_dir, "eval")
    best = min(evals, key=lambda e: e["val/loss"])
    summary = printed[printed.index("done: "):]
    assert "done: 20 iterations in " in summary and "(iter 0 -> 20)" in summary
    assert f"{20 * 2 * 4 * 32:,} tokens seen" in summary  # iterations x accumulation x batch x block
    assert f"best val loss {best['val/loss']:.4f} at iter {best['iter']}" in summary
    assert re.search(r"median step [\d.]+ ms = [\d,]+ tok/s$", summary, re.MULTILINE)  # no MFU on a CPU
    assert f"model folder: {os.path.abspath(out_dir)}" in summary
    assert f"sample from it: python sample.py --out_dir={out_dir}" in summary
    with open(os.path.join(out_dir, "loss.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert not os.path.exists(os.path.join(out_dir, "loss.png.tmp"))


def test_the_chart_takes_at_most_a_percent_of_the_run_and_the_last_eval_always_redraws(tiny_run, monkeypatch):
    """Evals at these seconds of a run whose redraw costs 0.5 s: a redraw only once 100 redraws'
    time has passed since the last (0.6 s assumed before the first), and always at the last eval."""
    out_dir, args = tiny_run
    train(load_config([*args, "--max_iters=2", "--eval_interval=1", "--eval_iters=1"]))
    clock, drawn, real_draw = [0.0], [], plot_module.draw

    def timed_draw(runs, output):
        real_draw(runs, output)
        drawn.append(clock[0])
        clock[0] += 0.5

    monkeypatch.setattr(plot_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(plot_module, "draw", timed_draw)
    os.remove(os.path.join(out_dir, "loss.png"))
    live = LivePlot(FakeAccelerator(), out_dir)
    for clock[0], last in ((10, False), (59, False), (61, False), (100, False), (112, False), (113, True)):
        live.update(last)
    assert drawn == [61, 112, 113]
    with open(os.path.join(out_dir, "loss.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_eta_is_wall_clock_rate_over_iterations_since_the_first_log(monkeypatch):
    clock = iter([0.0, 100.0, 110.0])  # created, first log, second log
    monkeypatch.setattr(progress_module.time, "time", lambda: next(clock))
    p = Progress(FakeAccelerator(), "out", max_iters=1000, start_iter=0, tokens_per_iter=1, flops_per_iter=1,
                 peak_flops=1)
    assert p.eta(0, 5.0) == ""
    assert p.eta(10, 0.5) == ", 1.00 it/s, ETA 16m29s"  # 989 iterations left at 1 it/s


def test_durations_use_the_two_largest_units():
    assert [format_duration(s) for s in (0, 42, 187, 7500, 200000)] == ["0s", "42s", "3m07s", "2h05m", "2d07h"]


def test_eval_bars_only_on_the_main_process_terminal_and_when_asked(monkeypatch):
    items = range(3)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert bar(True, items, "eval") is items  # piped to a log file: no bar
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert bar(False, items, "eval") is items
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bar(True, items, "eval") is items
    monkeypatch.delenv("TQDM_DISABLE")
    shown = bar(True, items, "eval val")
    assert shown is not items and not shown.disable and list(shown) == [0, 1, 2]
    second_process = type("State", (), {"local_process_index": 1})
    monkeypatch.setattr(sys.modules["accelerate.utils.tqdm"], "PartialState", second_process)
    assert bar(True, items, "eval").disable  # on every process but the main one


def write_metrics(out_dir, records, tokens_per_iter=None, tail=""):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)
    if tokens_per_iter:
        with open(os.path.join(out_dir, "training_config.json"), "w") as f:
            json.dump({"gradient_accumulation_steps": 1, "batch_size": tokens_per_iter, "block_size": 1}, f)


def fake_run(n_iters, start_loss, every=10):
    records = []
    for i in range(n_iters + 1):
        loss = start_loss / (1 + i / 20)
        if i % every == 0:
            records.append({"event": "eval", "iter": i, "train/loss": loss, "val/loss": loss * 1.02, "lr": 1e-3})
        records.append({"event": "train", "iter": i, "train/step_loss": loss, "lr": 1e-3 * min(1, (i + 1) / 10)})
    return records


def test_resumed_iterations_replace_the_earlier_ones_and_a_half_written_line_waits(tmp_path):
    first = fake_run(30, 4.0)
    replay = [{"event": "train", "iter": 25, "train/step_loss": 9.0, "lr": 1e-3}]
    write_metrics(tmp_path, first + replay, tail='{"event": "train", "iter": 31, "train/st')
    reader = CurvesReader(str(tmp_path))
    curves = reader.curves()
    assert dict(curves.step)[25] == 9.0 and max(dict(curves.step)) == 30
    assert curves.best == (30, 4.0 / 2.5, 4.0 / 2.5 * 1.02)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # the writer finishes the line
        f.write('ep_loss": 1.0, "lr": 1e-3}\n')
    assert dict(reader.curves().step)[31] == 1.0


@pytest.mark.slow
def test_plot_command_draws_several_runs_on_one_chart(tmp_path):
    write_metrics(tmp_path / "a" / "run", fake_run(40, 4.0), tokens_per_iter=768)
    write_metrics(tmp_path / "b" / "run", fake_run(60, 3.5), tokens_per_iter=1536)
    output = tmp_path / "both.png"
    result = run_script("-m", "gpt_train.plot", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"),
                        f"--output={output}")
    assert result.stdout.strip() == f"wrote {output}"
    assert output.read_bytes()[:8] == PNG_MAGIC
    one = run_script("-m", "gpt_train.plot", str(tmp_path / "a" / "run"))
    assert (tmp_path / "a" / "run" / "loss.png").read_bytes()[:8] == PNG_MAGIC, one.stdout


@pytest.mark.slow
def test_plot_of_a_folder_without_metrics_is_a_one_line_error(tmp_path):
    result = run_script("-m", "gpt_train.plot", str(tmp_path), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {tmp_path}/metrics.jsonl not found: "
                                     f"is {tmp_path} the out_dir of a gpt-train run?")
