"""stream_from=: training straight from datasets' streaming mode over local parquet and JSONL files:
each process its own documents, the val documents never trained on, exact resume after a kill -9
on one and two processes, the stream's end, and one-line refusals."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ACCELERATE, ROOT, TINY_MODEL, forget_the_run, free_port, one_line_error, read_metrics, \
    sha256, torch_threads
from gpt_train.cli import load_config
from gpt_train.commands import train as main
from gpt_train.stream import TokenStream, stream_codec
from gpt_train.tokenizer import Gpt2Codec
from gpt_train.train import train

SHAKESPEARE = os.path.join(ROOT, "data_prep", "tinyshakespeare", "input.txt")
VAL_DOCS = 40
STREAMED = [*TINY_MODEL, "--gradient_accumulation_steps=2", "--eval_interval=4", "--eval_iters=2",
            f"--stream_val_documents={VAL_DOCS}", "--dropout=0.1"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def paragraphs():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return [p for p in f.read().split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tiny Shakespeare's paragraphs as documents: two parquet files (two shards, with an `id`
    column beside `text`, as Hub corpora have) and one JSONL file."""
    folder = tmp_path_factory.mktemp("stream")
    docs = paragraphs()
    half = len(docs) // 2
    for name, part in (("a", docs[:half]), ("b", docs[half:])):
        pq.write_table(pa.table({"text": part, "id": list(range(len(part)))}), folder / f"{name}.parquet",
                       row_group_size=500)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"content": doc}) + "\n")
    return {"parquet": str(folder / "*.parquet"), "jsonl": str(folder / "docs.jsonl"), "docs": docs}


def settings(source, out_dir, *extra):
    return [f"--stream_from={source}", f"--out_dir={out_dir}", *STREAMED, *extra]


@pytest.mark.parametrize("processes", [1, 2])
def test_the_processes_read_the_whole_stream_between_them_except_the_val_documents(corpus, tmp_path, processes):
    cfg = load_config(settings(corpus["parquet"], tmp_path / "out", "--block_size=32", "--batch_size=4"))
    docs, codec = corpus["docs"], Gpt2Codec()
    tokens = 0
    for process in range(processes):
        stream = TokenStream(cfg, codec, process, processes, "cpu")
        steps = 0
        while stream.iteration(1) is not None:
            steps += 1
        tokens += steps * 4 * 32 + len(stream.tokens)  # what the steps took and what was left over
        np.testing.assert_array_equal(stream.eval_bins.arrays["val"], codec.encode_batch(docs[:VAL_DOCS], True))
        np.testing.assert_array_equal(stream.eval_bins.arrays["train"],
                                      codec.encode_batch(docs[VAL_DOCS:2 * VAL_DOCS], True))
    # every document but the val ones (by content: a repeated line of one is held out too), each once
    trained = [doc for doc in docs[VAL_DOCS:] if doc not in docs[:VAL_DOCS]]
    assert tokens == len(codec.encode_batch(trained, True))


def test_a_streamed_run_learns_and_leaves_a_plain_folder(corpus, tmp_path):
    out_dir = str(tmp_path / "out")
    train(load_config(settings(corpus["parquet"], out_dir, "--max_iters=12")))
    evals = read_metrics(out_dir, "eval")
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.5
    state = json.load(open(os.path.join(out_dir, "training_state", "stream-0.json")))
    assert state["dataset"] and isinstance(state["tokens"], list)
    assert os.path.exists(os.path.join(out_dir, "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("source, processes", [("parquet", 1), ("jsonl", 2)])
def test_a_streamed_run_resumes_exactly_after_a_kill(corpus, tmp_path, source, processes):
    """kill -9 after a checkpoint; the resumed run ends byte-identical to an uninterrupted one."""
    column = ["--stream_text_column=content"] if source == "jsonl" else []
    launch = [sys.executable, "train.py"] if processes == 1 else \
        [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port(), "train.py"]
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    common = [*settings(corpus[source], "", "--max_iters=14"), *column]
    subprocess.run([*launch, *common, f"--out_dir={straight}"], cwd=ROOT, env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*launch, *common, f"--out_dir={killed}"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("iter 10:") and any("saving" in s for s in seen):
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([*launch, *common, f"--out_dir={killed}", "--init_from=resume"], cwd=ROOT, env=env,
                             text=True, capture_output=True, check=True)
    # a checkpoint every 4 iterations: which one the kill left depends on how far the launcher's relayed output lags
    assert int(re.search(r"resuming from iteration (\d+)", resumed.stdout).group(1)) in (8, 12)
    assert sorted(n for n in os.listdir(os.path.join(killed, "training_state")) if n.startswith("stream-")) == \
        [f"stream-{i}.json" for i in range(processes)]
    losses = {e["iter"]: e["train/step_loss"] for e in read_metrics(killed, "train")}
    assert losses == {e["iter"]: e["train/step_loss"] for e in read_metrics(straight, "train")}
    assert sha256(os.path.join(killed, "model.safetensors")) == sha256(os.path.join(straight, "model.safetensors"))
    if processes == 2:  # positions are per process: another count cannot continue them
        error = one_line_error(None, None, None, ["train.py", *common, f"--out_dir={killed}", "--init_from=resume",
                                                  "--max_iters=16"], env=ONE_THREAD)
        assert "holds the stream positions of 2 process(es), not 1" in error


def test_a_stream_that_ends_saves_and_stops_or_starts_over_when_asked(corpus, tmp_path, capsys):
    docs = corpus["docs"][:2 * VAL_DOCS + 12]
    short = tmp_path / "short.parquet"
    pq.write_table(pa.table({"text": docs}), short)
    out_dir = str(tmp_path / "out")
    train(load_config(settings(str(short), out_dir, "--max_iters=200", "--always_save_checkpoint=True")))
    out = capsys.readouterr().out
    ended = [e["iter"] for e in read_metrics(out_dir, "eval")][-1]
    assert 0 < ended < 200 and f"ended: stopped after iteration {ended - 1} of 200" in out
    assert json.load(open(os.path.join(out_dir, "training_state", "trainer_state.json")))["iter_num"] == ended
    forget_the_run()
    repeated = str(tmp_path / "repeated")
    train(load_config(settings(str(short), repeated, f"--max_iters={ended + 8}", "--stream_repeat=True")))
    assert read_metrics(repeated, "eval")[-1]["iter"] == ended + 8


@pytest.mark.parametrize("extra, message", [
    (["--stream_text_column=body"], "has no column 'body' (columns: text, id): pass --stream_text_column=NAME"),
    (["--stream_val_documents=1", "--block_size=64"], "raise stream_val_documents, or lower block_size"),
    (["--stream_subset=sample-10BT", "--stream_from="], "stream_subset is for streamed runs: set stream_from too"),
])
def test_streaming_mistakes_are_one_line(corpus, tmp_path, capsys, extra, message):
    error = one_line_error(main, settings(corpus["parquet"], tmp_path / "out", *extra), capsys)
    assert message in error
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_dataset_or_missing_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    error = one_line_error(main, settings("HuggingFaceFW/fineweb-edu", tmp_path / "out", "--stream_subset=sample-10BT"),
                           capsys)
    assert error.startswith("error: could not stream 'HuggingFaceFW/fineweb-edu' (subset 'sample-10BT') (")
    error = one_line_error(main, settings(str(tmp_path / "missing.parquet"), tmp_path / "out"), capsys)
    assert "missing.parquet not found" in error


def test_a_streamed_fine_tune_encodes_with_the_models_tokenizer(corpus, char_data, tmp_path):
    """A char model streams in its own vocabulary: tokenizer= is needed only to choose another."""
    base = str(tmp_path / "base")
    with torch_threads(1):
        train(load_config([f"--data_dir={char_data}", f"--out_dir={base}", *TINY_MODEL, "--max_iters=2",
                           "--eval_interval=2", "--eval_iters=1"]))
    forget_the_run()
    cfg = load_config(settings(corpus["parquet"], tmp_path / "out", f"--init_from={base}", "--max_iters=4"))
    stream = TokenStream(cfg, stream_codec(cfg, base), 0, 1, "cpu")
    assert stream.eval_bins.arrays["val"].max() < 65  # Shakespeare's 65 characters, not GPT-2's ids
    train(cfg)
    assert read_metrics(str(tmp_path / "out"), "eval")


def test_a_resume_after_the_source_changed_is_refused_in_one_line_unless_allowed(corpus, tmp_path, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_bytes(open(corpus["jsonl"], "rb").read())
    out_dir = str(tmp_path / "out")
    args = [*settings(str(source), out_dir, "--max_iters=4"), "--stream_text_column=content"]
    train(load_config(args))
    forget_the_run()
    resume = [*args, "--init_from=resume", "--max_iters=8"]
    data = source.read_bytes()
    half = data[:data.index(b"\n", len(data) // 2) + 1]
    source.write_bytes(half)  # truncated at a line's end: still a valid file
    error = one_line_error(main, resume, capsys)
    assert f"{source} had {len(data):,} bytes, now {len(half):,}" in error
    assert error.endswith("Restore the files it read, or resume anyway with --stream_allow_changed=True")
    source.write_bytes(data.replace(b"ROMEO", b"ROMEX", 1))  # edited in place, the same size
    assert "has the same size but other contents" in one_line_error(main, resume, capsys)
    assert [r["iter"] for r in read_metrics(out_dir, "eval")] == [0, 4]  # nothing trained on the changed data
    train(load_config([*resume, "--stream_allow_changed=True"]))  # the documented way on
    assert [r["iter"] for r in read_metrics(out_dir, "eval")] == [0, 4, 8]


def test_bytes_that_are_not_utf8_mid_stream_are_one_line_naming_file_and_line(corpus, tmp_path, capsys):
    source = tmp_path / "docs.jsonl"
    lines = open(corpus["jsonl"], "rb").read().splitlines(keepends=True)
    lines[300] = json.dumps({"content": "Caf\u00e9"}).encode("utf-8").replace(b"\\u00e9", b"\xe9") + b"\n"  # Latin-1
    source.write_bytes(b"".join(lines))
    error = one_line_error(main, [*settings(str(source), tmp_path / "out", "--max_iters=200"),
                                  "--stream_text_column=content"], capsys)
    assert f"{source} is not UTF-8 text (line 301, byte 0xe9)" in error, error


def test_a_stream_too_short_for_its_val_documents_is_told_to_lower_them(corpus, tmp_path, capsys):
    short = tmp_path / "short.parquet"  # 44 documents of 6 tokens: val takes 40, the train sample gets 4
    pq.write_table(pa.table({"text": [f"line {i} of the short stream" for i in range(VAL_DOCS + 4)]}), short)
    error = one_line_error(main, settings(str(short), tmp_path / "out"), capsys)
    assert "lower stream_val_documents to at most 22 (the stream holds 44), or lower block_size" in error
    train(load_config(settings(str(short), tmp_path / "out", "--stream_val_documents=22", "--max_iters=2",
                               "--stream_repeat=True")))  # the advice, followed, trains
    assert read_metrics(tmp_path / "out", "eval")
