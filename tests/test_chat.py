"""Chat fine-tuning: conversations rendered with a chat template into bins and a loss mask, a loss
over the assistant's tokens alone, model folders that chat without gpt-train, sample.py --chat,
and one line for each bad conversation."""
import io
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, pipeline

from conftest import ROOT, forget_the_run, one_line_error, read_metrics
from gpt_train.chat import DEFAULT_TEMPLATE
from gpt_train.cli import load_config
from gpt_train.data import IGNORE_INDEX, BlockSampler, open_dataset
from gpt_train.commands import prepare as prepare_main
from gpt_train.sample import SampleConfig, chat
from gpt_train.train import forward_loss, train

TINY_CHATS = os.path.join(ROOT, "data_prep", "chat", "tiny_chats.jsonl")
RUN = ["--device=cpu", "--compile=False", "--block_size=64", "--batch_size=4", "--gradient_accumulation_steps=1",
       "--learning_rate=3e-3", "--warmup_iters=2", "--min_lr=3e-4", "--eval_iters=2", "--log_interval=1"]


@pytest.fixture(scope="module")
def chat_data(tiny_gpt2, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("data") / "chats")
    prepare_main(["chat", f"--source={TINY_CHATS}", f"--tokenizer_from={tiny_gpt2}", f"--out_dir={folder}",
                  "--max_tokens=64"])
    return folder


def test_conversations_become_bins_and_a_mask_of_the_assistants_tokens(chat_data, tiny_gpt2, capsys):
    tokenizer = AutoTokenizer.from_pretrained(chat_data)
    assert tokenizer.chat_template == DEFAULT_TEMPLATE  # GPT-2 has none: the default goes with the data
    ids = np.fromfile(os.path.join(chat_data, "train.bin"), dtype=np.uint16)
    mask = np.fromfile(os.path.join(chat_data, "train.mask.bin"), dtype=np.uint8)
    assert len(ids) == len(mask) and 0.1 < mask.mean() < 0.6
    answers, prompts = tokenizer.decode(ids[mask == 1]), tokenizer.decode(ids[mask == 0])
    assert "User:" not in answers and "Assistant:" not in answers and " is " in answers
    assert answers.count(tokenizer.eos_token) > 300  # each answer ends its turn
    assert "User: What is" in prompts and tokenizer.eos_token not in prompts
    # the first conversation, rendered and masked as transformers' own apply_chat_template does
    with open(TINY_CHATS) as f:
        first = [json.loads(line)["messages"] for line in f]
    rendered = [tokenizer.apply_chat_template(m, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
                for m in first]
    assert any(list(ids[:len(r["input_ids"])]) == r["input_ids"] and list(mask[:len(r["input_ids"])]) ==
               r["assistant_masks"] for r in rendered)


def test_the_loss_and_its_gradient_count_the_assistants_tokens_alone(chat_data, tiny_gpt2):
    bins = open_dataset(chat_data, 32, "")
    sampler = BlockSampler(bins, 32, 4, 1337, "cpu")
    x, y = sampler.batch("train", sampler.iteration_offsets("train", 0, 1)[0])
    assert bins.masked and (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).any()
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    loss = forward_loss(model, x, y, sampler.targets_per_batch("train", sampler.iteration_offsets("train", 0, 1)))
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # by hand: cross-entropy over the positions the mask keeps, nothing else
    logits = model(input_ids=x).logits
    kept = y != IGNORE_INDEX
    by_hand = torch.nn.functional.cross_entropy(logits[kept], y[kept])
    by_hand.backward()
    torch.testing.assert_close(loss, by_hand)
    for a, p in zip(ours, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
    # a batch of user turns alone has no target: its loss is 0, not NaN
    none = torch.full_like(y, IGNORE_INDEX)
    assert forward_loss(model, x, none, 1).item() == 0.0


def test_a_steps_loss_and_an_evaluations_are_means_over_every_target_token(chat_data, tiny_gpt2, tmp_path):
    """Micro-batches hold different numbers of the assistant's tokens: the step's loss (2 micro-steps)
    and the val loss are token means over all of them, not means of per-batch means."""
    out_dir = str(tmp_path / "out")
    train(load_config([f"--init_from={tiny_gpt2}", f"--data_dir={chat_data}", f"--out_dir={out_dir}", *RUN,
                       "--block_size=32", "--gradient_accumulation_steps=2", "--dropout=0.0", "--max_iters=1",
                       "--eval_interval=1"]))
    forget_the_run()
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    sampler = BlockSampler(open_dataset(chat_data, 32, ""), 32, 4, 1337, "cpu")

    def token_mean(split, offsets):
        losses, counts = [], []
        with torch.no_grad():
            for row in offsets:
                x, y = sampler.batch(split, row)
                kept = y != IGNORE_INDEX
                logits = model(input_ids=x).logits
                losses.append(torch.nn.functional.cross_entropy(logits[kept], y[kept], reduction="sum"))
                counts.append(kept.sum())
        assert len(set(c.item() for c in counts)) > 1  # the batches differ: a mean of means would differ too
        return (sum(losses) / sum(counts)).item()

    step = read_metrics(out_dir, "train")[0]["train/step_loss"]
    assert step == pytest.approx(token_mean("train", sampler.iteration_offsets("train", 0, 2)), rel=1e-5)
    val = read_metrics(out_dir, "eval")[0]["val/loss"]
    assert val == pytest.approx(token_mean("val", sampler.iteration_offsets("val", 0, 2, purpose="eval")), rel=1e-5)


def test_a_chat_fine_tune_saves_a_folder_that_chats_without_gpt_train(chat_data, tiny_gpt2, tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    train(load_config([f"--init_from={tiny_gpt2}", f"--data_dir={chat_data}", f"--out_dir={out_dir}", *RUN,
                       "--max_iters=6", "--eval_interval=3"]))
    printed = capsys.readouterr().out
    assert "chat data: the loss counts the assistant's tokens alone, " in printed
    evals = read_metrics(out_dir, "eval")
    assert evals[-1]["val/loss"] < evals[0]["val/loss"]
    assert os.path.isfile(os.path.join(out_dir, "chat_template.jinja"))
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "User: What is 2 plus 3?\nAssistant:"
    reply = pipeline("text-generation", model=out_dir, device="cpu")(messages, max_new_tokens=5)[0]["generated_text"]
    assert reply[0] == messages[0] and reply[-1]["role"] == "assistant"  # transformers' chat call
    forget_the_run()

    # sample.py --chat: each line a user turn, the conversation kept in the context
    cfg = load_config([f"--out_dir={out_dir}", "--chat=True", "--max_new_tokens=8", "--device=cpu"], SampleConfig)
    out = io.StringIO()
    history = chat(cfg, lines=["What is 2 plus 3?\n", "\n", "Repeat the word apple.\n"], out=out)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert out.getvalue().count("assistant: ") == 2
    # a long conversation drops its oldest turns to keep room for the answer (context 64 here)
    history = chat(cfg, lines=[f"What is {i} plus {i}?\n" for i in range(12)], out=io.StringIO())
    assert history[-2]["content"] == "What is 11 plus 11?" and len(history) < 24


def test_sample_chat_needs_a_chat_template(tiny_gpt2, capsys):
    from gpt_train.sample import main as sample_main
    error = one_line_error(sample_main, [f"--init_from={tiny_gpt2}", "--chat=True", "--device=cpu"], capsys)
    assert error.startswith(f"error: {tiny_gpt2} has no chat template: fine-tune it on a chat dataset first")


@pytest.mark.parametrize("records, message", [
    ([{"text": "no conversation"}] * 3, "has no column 'messages' (columns: text): pass --messages_column=NAME"),
    ([{"messages": "hello"}] * 3, "has no conversation: expected a non-empty list of {role, content}, got str"),
    ([{"messages": [{"role": "bot", "content": "hi"}]}] * 3, "role 'bot' is not one of system, user, assistant"),
    ([{"messages": [{"role": "user", "content": "hi"}]}] * 3, "has no assistant message: there is nothing to learn"),
    ([{"messages": [{"role": "user"}]}] * 3, "every message needs a 'role' and a text 'content'"),
])
def test_bad_conversations_get_one_line_and_write_no_dataset(tiny_gpt2, tmp_path, capsys, records, message):
    source = tmp_path / "bad.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    error = one_line_error(prepare_main, ["chat", f"--source={source}", f"--tokenizer_from={tiny_gpt2}",
                                          f"--out_dir={tmp_path / 'ds'}"], capsys)
    assert message in error
    assert not (tmp_path / "ds" / "train.bin").exists()


def test_a_char_vocabulary_cannot_end_a_turn(char_data, tmp_path, capsys):
    char_model = str(tmp_path / "char")
    from gpt_train.train import train as run
    run(load_config([f"--data_dir={char_data}", f"--out_dir={char_model}", "--n_layer=1", "--n_head=1",
                     "--n_embd=8", *RUN[:2], "--block_size=16", "--max_iters=1", "--eval_interval=1",
                     "--eval_iters=1"]))
    forget_the_run()
    capsys.readouterr()
    error = one_line_error(prepare_main, ["chat", f"--source={TINY_CHATS}", f"--tokenizer_from={char_model}",
                                          f"--out_dir={tmp_path / 'ds'}"], capsys)
    assert error.endswith("has no end-of-text token to end each assistant turn with (a char vocabulary has none): "
                          "fine-tune a model with GPT-2 BPE or its own BPE")


@pytest.mark.parametrize("too_long, kept", [("truncate", 400), ("drop", None)])
def test_conversations_longer_than_the_context_are_truncated_or_dropped_and_counted(tiny_gpt2, tmp_path, capsys,
                                                                                     too_long, kept):
    prepare_main(["chat", f"--source={TINY_CHATS}", f"--tokenizer_from={tiny_gpt2}", f"--out_dir={tmp_path / 'ds'}",
                  "--max_tokens=40", f"--too_long={too_long}"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("train:", "val:"))]
    counts = [int(line.split(": ")[1].split()[0].replace(",", "")) for line in lines]
    altered = [int(line.split("; ")[1].split()[0 if too_long == "truncate" else 3]) for line in lines]
    assert all(a > 0 for a in altered) and (sum(counts) == kept if kept else sum(counts) + sum(altered) == 400)
    assert np.fromfile(tmp_path / "ds" / "train.mask.bin", dtype=np.uint8).any()


def test_the_bad_conversation_is_named_by_its_file_and_line(tiny_gpt2, tmp_path, capsys):
    good = open(TINY_CHATS, encoding="utf-8").read().splitlines()[:20]
    bad = json.dumps({"messages": [{"role": "bot", "content": "hi"}]})
    source = tmp_path / "chats.jsonl"
    source.write_text("\n".join([*good[:12], "", bad, *good[12:]]) + "\n")  # a blank line before it, as people leave
    error = one_line_error(prepare_main, ["chat", f"--source={source}", f"--tokenizer_from={tiny_gpt2}",
                                          f"--out_dir={tmp_path / 'ds'}"], capsys)
    assert error == f"error: {source} line 14: role 'bot' is not one of system, user, assistant"


def test_a_template_that_does_not_mark_the_assistant_is_refused_though_it_says_generation(tiny_gpt2, tmp_path, capsys):
    # ChatML as many models ship it: add_generation_prompt, no {% generation %} markers
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
              "{% endif %}")
    model = tmp_path / "chatml"
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.chat_template = chatml
    tokenizer.save_pretrained(model)
    error = one_line_error(prepare_main, ["chat", f"--source={TINY_CHATS}", f"--tokenizer_from={model}",
                                          f"--out_dir={tmp_path / 'ds'}"], capsys)
    assert "chat template does not mark the assistant's tokens ({% generation %}" in error
    assert not (tmp_path / "ds").exists()


def test_a_latin1_conversation_file_is_one_line_naming_file_line_and_byte(tiny_gpt2, tmp_path, capsys):
    lines = open(TINY_CHATS, "rb").read().splitlines(keepends=True)[:20]
    lines[6] = lines[6].replace(b"?", "\u00e9?".encode("latin-1"), 1)  # a file saved in Latin-1
    source = tmp_path / "chats.jsonl"
    source.write_bytes(b"".join(lines))
    error = one_line_error(prepare_main, ["chat", f"--source={source}", f"--tokenizer_from={tiny_gpt2}",
                                          f"--out_dir={tmp_path / 'ds'}"], capsys)
    assert f"{source} is not UTF-8 text (line 7, byte 0xe9)" in error


def test_gpt2s_tokenizer_needs_no_network(tmp_path, monkeypatch, capsys):
    import gpt_train.tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = gpt_train.tokenizer.pretrained_folder
    monkeypatch.setattr(gpt_train.tokenizer, "pretrained_folder", lambda name, setting: pytest.fail(name) if
                        name == "gpt2" else real(name, setting))  # neither the Hub nor its cache is asked
    prepare_main(["chat", f"--source={TINY_CHATS}", "--tokenizer_from=gpt2", f"--out_dir={tmp_path / 'ds'}"])
    assert AutoTokenizer.from_pretrained(tmp_path / "ds").chat_template == DEFAULT_TEMPLATE
    error = one_line_error(prepare_main, ["chat", f"--source={TINY_CHATS}", "--tokenizer_from=someone/missing",
                                          f"--out_dir={tmp_path / 'ds2'}"], capsys)
    assert "(tokenizer_from)" in error and "set tokenizer_from to a local model folder" in error
    assert "init_from" not in error
