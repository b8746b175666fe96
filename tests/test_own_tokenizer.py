"""A byte-level BPE trained on the user's corpus (`--tokenizer=bpe`), and bits per byte, which
compares runs whatever their tokenizer."""
import json
import math
import os
import random

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import ROOT, TINY_MODEL, one_line_error, read_metrics, run_script, sha256
from gpt_train.commands import train as main
from gpt_train.convert import main as convert_main
from gpt_train.plot import main as plot_main
from gpt_train.commands import prepare as prepare_main
from gpt_train.sample import main as sample_main

SHAKESPEARE = os.path.join(ROOT, "data_prep", "tinyshakespeare", "input.txt")
MIXED_TEXT = "Café naïve Ωμέγα, 日本語の文章、中文。 Emoji 🎉👩‍👩‍👧 and tabs\tand\r\nnewlines <|endoftext|> "


def prepare(source, out_dir, *settings):
    prepare_main(["custom", f"--source={source}", f"--out_dir={out_dir}", "--tokenizer=bpe", *settings])
    return str(out_dir)


@pytest.fixture(scope="module")
def own_bpe(tmp_path_factory):
    """Tiny Shakespeare with a 512-token BPE learnt from its first 90%."""
    return prepare(SHAKESPEARE, tmp_path_factory.mktemp("data") / "own", "--vocab_size=512")


@pytest.fixture(scope="module")
def own_model(own_bpe, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("runs") / "own")
    main([f"--data_dir={own_bpe}", f"--out_dir={out_dir}", *TINY_MODEL, "--max_iters=4", "--eval_interval=4",
          "--eval_iters=2"])
    return out_dir


def test_the_tokenizer_is_learnt_from_the_train_split_alone_and_deterministically(tmp_path):
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()[:150_000]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text + "zqxvw " * 2000, encoding="utf-8")  # 12,000 characters, within the val tail
    first = prepare(corpus, tmp_path / "a", "--vocab_size=400", "--val_fraction=0.1")
    second = prepare(corpus, tmp_path / "b", "--vocab_size=400", "--val_fraction=0.1", "--num_proc=2")
    for name in ("train.bin", "val.bin", "tokenizer.json", "tokenizer_config.json"):
        assert sha256(os.path.join(first, name)) == sha256(os.path.join(second, name)), name
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert len(tokenizer) == 400 and tokenizer.eos_token == "<|endoftext|>" == tokenizer.bos_token
    assert not [t for t in tokenizer.get_vocab() if "zq" in t or "xv" in t]  # val's word: never merged
    assert tokenizer.decode(np.fromfile(os.path.join(first, "val.bin"), dtype=np.uint16).tolist(),
                            skip_special_tokens=True).endswith("zqxvw " * 2000)
    assert len(tokenizer.encode(" the")) == 1 and len(tokenizer.encode(" and")) == 1  # common words: one token


@pytest.mark.slow
def test_any_text_round_trips_and_the_folder_loads_in_a_fresh_interpreter(own_bpe):
    code = ("import sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "ids = t.encode(sys.argv[2]); print(len(ids), t.decode(ids) == sys.argv[2], max(ids) < len(t))")
    result = run_script("-c", code, own_bpe, MIXED_TEXT, env={"HF_HUB_OFFLINE": "1"})
    count, same, in_range = result.stdout.split()
    assert same == "True" and in_range == "True" and int(count) > 10


@pytest.mark.slow
def test_a_model_takes_its_vocabulary_from_the_data_and_carries_the_tokenizer(own_bpe, own_model, tmp_path,
                                                                              capsys):
    with open(os.path.join(own_model, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 512  # not GPT-2's 50,304
    code = ("import sys; from transformers import pipeline; g = pipeline('text-generation', model=sys.argv[1]); "
            "print(g(sys.argv[2], max_new_tokens=4)[0]['generated_text'].startswith(sys.argv[2]))")
    assert run_script("-c", code, own_model, "Café 日本 🎉", env={"HF_HUB_OFFLINE": "1"}).stdout.split()[-1] == "True"
    capsys.readouterr()
    sample_main([f"--out_dir={own_model}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=8",
                 "--device=cpu"])  # sample.py's main, in process
    assert "ROMEO:" in capsys.readouterr().out
    refused = one_line_error(convert_main, ["to-nanogpt", own_model, str(tmp_path / "ckpt.pt")], capsys)
    assert refused.startswith(f"error: {own_model} has its own BPE tokenizer (512 tokens), and nanoGPT reads only")
    assert not (tmp_path / "ckpt.pt").exists()


def test_new_text_prepared_with_the_models_tokenizer_fine_tunes_it(own_model, tmp_path, capsys):
    """--tokenizer_from: a model with its own BPE (or characters) fine-tunes on text prepared later."""
    corpus = tmp_path / "new.txt"
    corpus.write_text("Café society met in the garden. " * 400)
    prepare_main(["custom", f"--source={corpus}", f"--out_dir={tmp_path / 'new'}", f"--tokenizer_from={own_model}"])
    assert AutoTokenizer.from_pretrained(tmp_path / "new").get_vocab() == AutoTokenizer.from_pretrained(
        own_model).get_vocab()
    main([f"--init_from={own_model}", f"--data_dir={tmp_path / 'new'}", f"--out_dir={tmp_path / 'ft'}",
          *TINY_MODEL[6:], "--max_iters=2", "--eval_interval=2", "--eval_iters=1"])
    assert (tmp_path / "ft" / "model.safetensors").is_file()


def test_a_character_a_char_model_lacks_is_named_with_where_it_occurs(char_data, tmp_path, capsys):
    char_model = str(tmp_path / "char")
    main([f"--data_dir={char_data}", f"--out_dir={char_model}", *TINY_MODEL, "--max_iters=1", "--eval_interval=1",
          "--eval_iters=1"])
    corpus = tmp_path / "new.txt"
    corpus.write_text("ROMEO:\nWhat light through yonder window breaks?\nIt is the east, and Juliet is the sün.\n"
                      * 50)
    capsys.readouterr()
    error = one_line_error(prepare_main, ["custom", f"--source={corpus}", f"--out_dir={tmp_path / 'new'}",
                                          f"--tokenizer_from={char_model}"], capsys)
    assert error == (f"error: {char_model}'s char vocabulary has no 'ü' (document 0, line 3): remove or replace "
                     "that character, or prepare the data for a model with a BPE vocabulary")
    corpus.write_text(corpus.read_text().replace("ü", "u"))
    prepare_main(["custom", f"--source={corpus}", f"--out_dir={tmp_path / 'new'}", f"--tokenizer_from={char_model}"])
    main([f"--init_from={char_model}", f"--data_dir={tmp_path / 'new'}", f"--out_dir={tmp_path / 'ft'}",
          *TINY_MODEL[6:], "--block_size=16", "--max_iters=2", "--eval_interval=2", "--eval_iters=1"])
    assert (tmp_path / "ft" / "model.safetensors").is_file()


def test_fine_tuning_a_gpt2_model_on_data_with_another_tokenizer_is_refused(own_bpe, bpe_data, tmp_path, capsys):
    gpt2_like = str(tmp_path / "gpt2-like")
    main([f"--data_dir={bpe_data}", f"--out_dir={gpt2_like}", *TINY_MODEL, "--max_iters=1", "--eval_interval=1",
          "--eval_iters=1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([f"--init_from={gpt2_like}", f"--data_dir={own_bpe}", f"--out_dir={tmp_path / 'tuned'}", *TINY_MODEL])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {own_bpe} was encoded with another tokenizer than {gpt2_like}'s (id 257 is ")  # the 256 bytes agree
    assert not (tmp_path / "tuned").exists()


def test_ids_fill_uint16_and_a_vocabulary_beyond_it_is_refused_before_anything_is_written(tmp_path, capsys):
    rng = random.Random(0)
    words = (''.join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
             for _ in range(250_000))
    corpus = tmp_path / "words.txt"
    corpus.write_text(" ".join(words))
    full = prepare(corpus, tmp_path / "full", "--vocab_size=65536")
    tokenizer = AutoTokenizer.from_pretrained(full)
    assert len(tokenizer) == 65536 and tokenizer.eos_token_id == 65535
    train = np.fromfile(os.path.join(full, "train.bin"), dtype=np.uint16)
    assert train.max() == 65535 and train[-1] == 65535  # the end-of-text id, last in the vocabulary
    capsys.readouterr()

    with pytest.raises(SystemExit) as exited:
        prepare(corpus, tmp_path / "too-big", "--vocab_size=65537")
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err == ("error: vocab_size must be between 257 (the 256 bytes and end-of-text) "
                                              "and 65,536 (ids must fit the uint16 bins nanoGPT's format uses), "
                                              "got 65,537\n")
    assert not (tmp_path / "too-big").exists()


def hand_bits_per_byte(data_dir, tokenizer, val_loss):
    """nats per token x tokens / bytes of the val text / ln 2, the text decoded from val.bin."""
    ids = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=np.uint16).tolist()
    text_bytes = len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
    return val_loss * len(ids) / text_bytes / math.log(2)


def test_bits_per_byte_everywhere_and_across_tokenizers(own_bpe, own_model, char_data, tmp_path, capsys):
    [evaluation] = read_metrics(own_model, "eval")[-1:]
    expected = hand_bits_per_byte(own_bpe, AutoTokenizer.from_pretrained(own_bpe), evaluation["val/loss"])
    assert evaluation["val/bpb"] == pytest.approx(expected, rel=1e-9)
    with open(os.path.join(own_model, "README.md")) as f:
        assert f"({expected:.4f} bits per byte of val text)" in f.read()

    char_run = str(tmp_path / "char")
    main([f"--data_dir={char_data}", f"--out_dir={char_run}", *TINY_MODEL, "--max_iters=2", "--eval_interval=2",
          "--eval_iters=2"])
    last = read_metrics(char_run, "eval")[-1]
    char_tokenizer = AutoTokenizer.from_pretrained(char_run)
    assert last["val/bpb"] == pytest.approx(hand_bits_per_byte(char_data, char_tokenizer, last["val/loss"]), rel=1e-9)
    assert f"val loss {last['val/loss']:.4f} ({last['val/bpb']:.4f} bits per byte)" in capsys.readouterr().out

    chart = tmp_path / "compare.png"
    plot_main([own_model, char_run, "--bits_per_byte", f"--output={chart}"])
    assert chart.stat().st_size > 10_000
    with open(os.path.join(char_run, "metrics.jsonl")) as f:  # a run logged before bits per byte were
        old = [json.loads(line) for line in f]
    (tmp_path / "old").mkdir()
    with open(tmp_path / "old" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k != "val/bpb"}) + "\n" for r in old)
    with pytest.raises(SystemExit):
        plot_main([char_run, str(tmp_path / "old"), "--bits_per_byte", f"--output={chart}"])
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'old'} has no val/bpb in its metrics.jsonl")
