"""chunked_loss=True: the LM head and cross-entropy a chunk of tokens at a time (gpt_train.loss)
give transformers' loss and gradients within float32 rounding, train the same run, and leave
the same plain GPT-2 folder."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, pipeline

from conftest import TINY_MODEL, read_metrics, run_script
from gpt_train import loss as loss_module
from gpt_train.cli import load_config
from gpt_train.loss import IGNORE_INDEX, chunk_tokens, linear_cross_entropy
from gpt_train.train import train


def plain_loss(hidden, weight, targets, num_items):
    logits = (hidden @ weight.T).float()  # transformers' LM head, then its float32 cross-entropy
    if num_items is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items


def loss_and_gradients(fn, hidden, weight, targets, num_items, autocast):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(hidden, weight, targets, num_items)
    (loss * 3).backward()  # a scaled loss, as gradient accumulation's division makes it
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("num_items", [None, 150])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16 autocast"])
def test_loss_and_gradients_equal_the_plain_cross_entropy(num_items, autocast):
    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 32), torch.randn(1000, 32) * 0.1
    targets = torch.randint(0, 1000, (300,))
    targets[::7] = IGNORE_INDEX  # a chat batch's user turns

    def chunked(h, w, t, n):
        return linear_cross_entropy(h, w, t, n, chunk=64)  # five chunks, the last one short

    plain = loss_and_gradients(plain_loss, hidden, weight, targets, num_items, autocast)
    ours = loss_and_gradients(chunked, hidden, weight, targets, num_items, autocast)
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if not autocast else {"rtol": 2e-2, "atol": 1e-3}
    for a, b in zip(plain, ours, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b, a, **tolerance)
    assert ours[1][::7].abs().max() == 0  # ignored targets give their hidden states no gradient
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # evaluation: the loss alone
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, num_items, chunk=64), plain[0],
                                   **tolerance)


def test_a_chunk_holds_a_quarter_gigabyte_of_float32_logits_at_most():
    assert chunk_tokens(50304) == 1024 and chunk_tokens(65) == 1 << 19  # characters: a micro-batch in one chunk
    assert chunk_tokens(10 ** 7) == loss_module.MIN_CHUNK_TOKENS


def tiny_bpe_run(bpe_data, out_dir, *extra):
    return [f"--data_dir={bpe_data}", f"--out_dir={out_dir}", *TINY_MODEL, "--block_size=64", "--batch_size=4",
            "--gradient_accumulation_steps=2", "--dropout=0.1", "--max_iters=6", "--eval_interval=3",
            "--eval_iters=2", *extra]


def test_a_run_trains_the_same_and_saves_the_same_plain_folder(bpe_data, tmp_path, monkeypatch):
    """GPT-2's vocabulary, 256 tokens per micro-batch in chunks of 64, dropout on: the same losses,
    weights within float32 rounding, the same files, and transformers' pipeline reads the folder."""
    monkeypatch.setattr(loss_module, "chunk_tokens", lambda vocab_size: 64)
    runs = {}
    for chunked in (False, True):
        out_dir = str(tmp_path / f"chunked-{chunked}")
        train(load_config(tiny_bpe_run(bpe_data, out_dir, f"--chunked_loss={chunked}")))
        runs[chunked] = out_dir
    for event, key in (("train", "train/step_loss"), ("eval", "val/loss")):
        plain, ours = ([r[key] for r in read_metrics(runs[c], event)] for c in (False, True))
        assert len(plain) == len(ours) > 1 and ours == pytest.approx(plain, rel=1e-5)
    assert sorted(os.listdir(runs[True])) == sorted(os.listdir(runs[False]))
    with open(os.path.join(runs[True], "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["GPT2LMHeadModel"]
    plain, ours = (GPT2LMHeadModel.from_pretrained(runs[c]).state_dict() for c in (False, True))
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-3, atol=1e-5)  # Adam scales tiny gradients up
    text = pipeline("text-generation", model=runs[True], device="cpu")("ROMEO:", max_new_tokens=5)
    assert text[0]["generated_text"].startswith("ROMEO:")


def test_a_lora_run_uses_it_too(bpe_data, tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setattr(loss_module, "chunk_tokens", lambda vocab_size: 64)
    losses = {}
    for chunked in (False, True):
        out_dir = str(tmp_path / f"lora-{chunked}")
        train(load_config(tiny_bpe_run(bpe_data, out_dir, f"--init_from={tiny_gpt2}", "--finetune_method=lora",
                                       "--n_layer=2", "--n_head=2", "--n_embd=16", f"--chunked_loss={chunked}")))
        losses[chunked] = [r["train/step_loss"] for r in read_metrics(out_dir, "train")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.slow
def test_the_compiled_step_has_no_graph_break_and_the_same_losses(bpe_data, tmp_path):
    """bench.py, compiled on CPU: the chunked loss (an autograd.Function looping over chunks)
    compiles into the training graph, and trains as the eager run does."""
    losses = {}
    for compiled in (False, True):
        result = run_script("bench.py", f"--data_dir={bpe_data}", "--device=cpu", f"--compile={compiled}",
                            "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=256", "--batch_size=8",
                            "--chunked_loss=True", "--bench_iters=3", "--bench_warmup=1", "--dtype=bfloat16")
        losses[compiled] = [float(line.split("loss ")[1].split(",")[0]) for line in result.stdout.splitlines()
                            if line.startswith("iter ")]
        if compiled:
            assert "torch.compile: 2 graph(s) (training, evaluation), 0 graph break(s)" in result.stdout
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)  # bf16: the compiled kernels round differently


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp"])
def test_two_processes_train_with_it_as_one_process_without_it(launch, bpe_data, tmp_path, monkeypatch):
    """DDP's gradient hooks and FSDP2's gathered LM head take the gradients the chunked loss
    computes in its forward as they take autograd's: the same losses as one plain process."""
    from test_distributed import launch_two
    from test_fsdp import launch_fsdp
    args = tiny_bpe_run(bpe_data, str(tmp_path / "two"), "--dropout=0.0", "--dtype=float32",
                        "--gradient_accumulation_steps=4", "--batch_size=20")  # 1,280 tokens: two chunks
    if launch == "ddp":
        launch_two(*args, "--chunked_loss=True")
    else:
        launch_fsdp(tmp_path / "two", *[a for a in args if not a.startswith("--out_dir")], "--chunked_loss=True")
    train(load_config([*args, f"--out_dir={tmp_path / 'one'}"]))
    for event, key in (("train", "train/step_loss"), ("eval", "val/loss")):
        two, one = ([r[key] for r in read_metrics(tmp_path / name, event)] for name in ("two", "one"))
        assert len(two) == len(one) > 1 and two == pytest.approx(one, abs=1e-4), (event, two, one)


def test_float16_is_refused_in_one_line(tiny_run, capsys, monkeypatch):
    """On a GPU without bf16 (T4, V100) dtype='auto' is float16, whose loss scale reaches the chunked
    loss's gradients only after they were rounded: refused before anything loads. No such GPU
    here: the precision it would resolve to is the one thing stood in for."""
    from conftest import one_line_error
    from gpt_train import start as start_module
    from gpt_train.commands import train as main
    out_dir, args = tiny_run
    monkeypatch.setattr(start_module, "mixed_precision", lambda dtype, device: "fp16")
    error = one_line_error(main, [*args, "--chunked_loss=True"], capsys)
    assert "chunked_loss computes its gradients before float16's loss scaling" in error
    assert "--dtype=bfloat16" in error and not os.path.exists(out_dir)
