"""report_to: wandb, TensorBoard and Trackio get the numbers metrics.jsonl gets, under the same names at the
same steps, one tracker or several, and a resume continues each one's run. Everything offline: TensorBoard's
event files are read back, Trackio runs in its local mode, wandb with WANDB_MODE=offline."""
import glob
import json
import os
import shutil
import struct
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import forget_the_run, one_line_error, run_script, tmpfs, tree_digest
from gpt_train.cli import load_config
from gpt_train.commands import train as main
from gpt_train.errors import UserError
from gpt_train.hub import published_files
from gpt_train.out_dir import read_metrics
from gpt_train.train import train

SHORT = ["--max_iters=4", "--eval_interval=2", "--eval_iters=1"]
NOT_METRICS = ("event", "iter", "time")  # metrics.jsonl's own fields; the rest is what every tracker gets


@pytest.fixture(scope="session")
def trackio_dir(tmp_path_factory):
    """Trackio's local store for the tests, never ~/.cache: trackio reads TRACKIO_DIR once, on import."""
    folder = tmp_path_factory.mktemp("trackio")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACKIO_DIR", str(folder))
        import trackio.utils
        assert trackio.utils.TRACKIO_DIR == folder, "trackio was imported before TRACKIO_DIR was set"
        yield folder


def metric_values(record):
    return {k: v for k, v in record.items() if k not in NOT_METRICS}


def tensorboard_scalars(folder):
    """Sorted (tag, step, value) of the TensorBoard run in `folder` as TensorBoard shows it: what a
    restarted writer's purge_step hides is left out."""
    events = EventAccumulator(folder, size_guidance={"scalars": 0})
    events.Reload()
    return sorted((tag, e.step, e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag))


def assert_tensorboard_holds(folder, records):
    """TensorBoard's scalars are these metrics.jsonl records' values (TensorBoard stores float32)."""
    want = sorted((k, r["iter"], v) for r in records for k, v in metric_values(r).items())
    got = tensorboard_scalars(folder)
    assert [(tag, step) for tag, step, _ in got] == [(tag, step) for tag, step, _ in want]
    assert [v for *_, v in got] == pytest.approx([v for *_, v in want], rel=1e-6)


def trackio_runs(project):
    from trackio.sqlite_storage import SQLiteStorage
    return SQLiteStorage.get_run_records(project)


def trackio_log(project, run):
    """(step, metrics) of each row Trackio's local store holds for the run, in the order logged."""
    from trackio.sqlite_storage import SQLiteStorage
    rows = SQLiteStorage.get_logs(project, run["name"], run_id=run["id"])
    return [(row["step"], {k: v for k, v in row.items() if k not in ("step", "timestamp")}) for row in rows]


def wandb_history(run_file):
    """{step: metrics} of an offline wandb run, read from its .wandb file: LevelDB-log records of
    wandb's protobufs (what `wandb sync` uploads), which wandb itself cannot read back offline."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7  # LevelDB log blocks; each record: crc32, length, type (full/first/middle/last)
    with open(run_file, "rb") as f:
        data = f.read()
    pos, chunk, history = header, b"", {}  # after the file's own header (":W&B", magic, version)
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        chunk, pos = chunk + data[pos + header:pos + header + length], pos + header + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def tracked_run(args, *extra):
    """A run in this process, then Accelerate's singletons forgotten, as a new process would start."""
    run = train(load_config([*args, *extra]))
    forget_the_run()
    return run


def test_tensorboard_and_trackio_get_what_metrics_jsonl_gets(tiny_run, tmp_path, trackio_dir):
    out_dir, args = tiny_run
    project = tmp_path.name
    tracked_run(args, *SHORT, "--report_to=tensorboard,trackio", f"--project={project}", "--run_name=tiny")
    records = read_metrics(out_dir)
    assert {r["event"] for r in records} == {"train", "eval"}
    assert os.listdir(os.path.join(out_dir, "runs")) == [project]  # TensorBoard's folder: out_dir/runs/<project>
    assert_tensorboard_holds(os.path.join(out_dir, "runs", project), records)
    (run,) = trackio_runs(project)
    assert run["name"] == "tiny"
    # float64 there, as in metrics.jsonl: exactly equal
    assert trackio_log(project, run) == [(r["iter"], metric_values(r)) for r in records]
    assert not any(name.startswith("runs") for name in published_files(out_dir))  # a Hub push leaves them

    tracked_run(args, "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--report_to=tensorboard",
                f"--wandb_project={project}", "--overwrite_output_dir=True")
    assert_tensorboard_holds(os.path.join(out_dir, "runs", project), read_metrics(out_dir))  # the old run's: gone


def test_a_resume_continues_the_same_tensorboard_and_trackio_runs(tiny_run, tmp_path, trackio_dir):
    out_dir, args = tiny_run
    project = tmp_path.name
    tracked_run(args, *SHORT, "--report_to=tensorboard,trackio", f"--wandb_project={project}")
    first = read_metrics(out_dir)
    (run,) = trackio_runs(project)
    tracked_run(args, *SHORT[1:], "--max_iters=6", "--init_from=resume")  # report_to is the run's own
    records = read_metrics(out_dir)
    kept = [r for r in first if r["iter"] < 4]  # metrics.jsonl drops the first session's iteration 4 ...
    assert records[:len(kept)] == kept
    resumed = records[len(kept):]
    assert resumed[0] == {**resumed[0], "event": "eval", "iter": 4}  # ... which the resumed run evaluates again
    # one TensorBoard run; the first session's iteration 4 hidden, as the resumed run logged it again
    assert os.listdir(os.path.join(out_dir, "runs")) == [project]
    assert_tensorboard_holds(os.path.join(out_dir, "runs", project), kept + resumed)
    assert trackio_runs(project) == [run]  # the same Trackio run, its steps continued (it keeps both 4s)
    assert [step for step, _ in trackio_log(project, run)] == [r["iter"] for r in first + resumed]

    before = tree_digest(out_dir)
    tracked_run(args, "--init_from=resume", "--eval_only=True", "--report_to=tensorboard")
    assert tree_digest(out_dir) == before  # an evaluation writes no TensorBoard files either


@pytest.mark.slow  # wandb starts its wandb-core process
def test_wandb_tensorboard_and_trackio_at_once_get_the_same_numbers(tiny_run, tmp_path, monkeypatch, trackio_dir):
    out_dir, args = tiny_run
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(name, value)
    project = tmp_path.name
    tracked_run(args, *SHORT, "--report_to=wandb,tensorboard,trackio", f"--wandb_project={project}")
    records = read_metrics(out_dir)
    assert_tensorboard_holds(os.path.join(out_dir, "runs", project), records)
    (run,) = trackio_runs(project)
    assert trackio_log(project, run) == [(r["iter"], metric_values(r)) for r in records]
    steps = {}  # wandb keeps one row per step: a step's train and eval values together
    for r in records:
        steps.setdefault(r["iter"], {}).update(metric_values(r))
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert wandb_history(run_file) == steps


def test_report_to_takes_training_arguments_spellings(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("wandb_log = True\nreport_to = ['tensorboard', 'trackio']\n")
    with pytest.raises(UserError, match="sets report_to=.* and wandb_log"):
        load_config([str(preset), "--wandb_log=False", "--report_to=wandb"])  # one layer contradicting itself
    preset.write_text("report_to = ['wandb', 'tensorboard']\n")
    cfg = load_config([str(preset)])
    assert (cfg.report_to, cfg.wandb_log, cfg.trackers) == ("tensorboard", True, ["wandb", "tensorboard"])
    assert load_config([str(preset), "--wandb_log=False"]).trackers == ["tensorboard"]  # later wins, wandb too
    assert load_config([str(preset), "--report_to=none"]).trackers == []
    preset.write_text("wandb_log = True\n")  # as configs/train_gpt2.py says
    assert load_config([str(preset), "--report_to=trackio"]).trackers == ["trackio"]
    assert load_config(["--wandb_log=True", "--report_to=tensorboard"]).trackers == ["wandb", "tensorboard"]


def test_an_unknown_tracker_is_one_line_naming_the_valid_ones(tiny_run, capsys):
    out_dir, args = tiny_run
    assert one_line_error(main, [*args, "--report_to=tensorboard,tensorbord"], capsys) == (
        "error: report_to='tensorbord' is not a tracker gpt-train reports to: choose from none, wandb, "
        "tensorboard, trackio (several comma-separated)")
    assert one_line_error(main, [*args, "--report_to=tensorboard", "--wandb_project=../up"], capsys) == (
        "error: wandb_project='../up' names TensorBoard's folder under out_dir/runs/: give a plain name")


def test_a_tracker_that_is_not_installed_is_one_line_before_anything_is_written(tiny_run, monkeypatch, capsys):
    out_dir, args = tiny_run
    monkeypatch.setitem(sys.modules, "trackio", None)  # what importlib finds of a package not installed
    assert one_line_error(main, [*args, *SHORT, "--report_to=trackio"], capsys) == (
        "error: report_to=trackio needs the trackio package, which is not installed: pip install -r requirements.txt")
    assert not os.path.exists(os.path.join(out_dir, "training_config.json"))


def test_a_trackio_folder_that_cannot_be_written_is_one_line_before_training(tiny_run, tmp_path, monkeypatch,
                                                                             capsys):
    out_dir, args = tiny_run
    blocker = tmp_path / "a-file"  # a path under a file: no user, root included, can make that folder
    blocker.write_text("")
    monkeypatch.setenv("TRACKIO_DIR", str(blocker / "trackio"))
    error = one_line_error(main, [*args, *SHORT, "--report_to=trackio"], capsys)
    assert error == (f"error: report_to=trackio cannot write to {blocker / 'trackio'} (Not a directory): set "
                     "TRACKIO_DIR to a folder you can write to")
    assert not os.path.exists(out_dir)


@pytest.mark.slow  # the writer thread's traceback came at the interpreter's exit: a fresh one
def test_a_tensorboard_folder_that_cannot_be_written_is_the_one_line_alone(tiny_checkpoint, char_data, tmp_path):
    out_dir = str(tmp_path / "out")
    shutil.copytree(tiny_checkpoint, out_dir)
    with tmpfs(os.path.join(out_dir, "runs", "owt"), "1m", read_only=True) as folder:
        result = run_script("train.py", f"--data_dir={char_data}", f"--out_dir={out_dir}", "--init_from=resume",
                            "--max_iters=8", "--report_to=tensorboard", check=False)
    assert result.returncode == 2
    assert result.stderr == (f"error: report_to=tensorboard cannot write to {folder} (Read-only file system): make "
                             "it writable, or leave tensorboard out of report_to\n")  # no writer thread's traceback
