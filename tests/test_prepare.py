"""Corpus preparers on data the tests write, through the real datasets code path."""
import json
import os
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import run_script, sha256
from gpt_train.data import open_dataset, read_meta
from gpt_train.errors import UserError
from gpt_train.prepare import OWT_SPLIT_SEED, OWT_VAL_FRACTION, prepare_corpus
from gpt_train.tokenizer import GPT2_EOT_ID, gpt2_encoding, gpt2_tokenizer

# sha256 of nanoGPT's data/shakespeare bins: its prepare.py run on the same input.txt with
# tiktoken's "gpt2" encoding (301,966 and 36,059 tokens).
NANOGPT_BPE_SHA256 = {
    "train.bin": "502a2bdc8210d1ac5d5674867cb74467dd31db575d25cf6dbb08c8bdbea8680f",
    "val.bin": "68a53422394c26a655ebe641f5c6f49888e8f4e45fe5d6f02abda63ba3ebd65b",
}
WORDS = "the of and to a in that is was he for it with as his on be at by I had not".split()


def documents(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 40))) + f" #{i} ünïcödé ✓" for i in range(n)]


def write_jsonl(path, texts, column="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({column: t, "id": i}) + "\n")
    return str(path)


def tokens(folder, split):
    return np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=np.uint16)


def test_tiktoken_gpt2_from_the_bundled_files_matches_the_gpt2_tokenizer():
    encoding = gpt2_encoding()
    assert encoding.n_vocab == 50257 and encoding.eot_token == GPT2_EOT_ID
    text = "Hello world! ROMEO: O, she doth teach the torches to burn bright. 1234 ünï"
    from gpt_train.tokenizer import gpt2_tokenizer
    assert encoding.encode_ordinary(text) == gpt2_tokenizer()(text)["input_ids"]


def test_shakespeare_bpe_is_byte_identical_to_nanogpts(bpe_data):
    for name, digest in NANOGPT_BPE_SHA256.items():
        assert sha256(os.path.join(bpe_data, name)) == digest, name
    assert open_dataset(bpe_data, 1024, "prepare").lengths == {"train": 301_966, "val": 36_059}
    assert read_meta(bpe_data) is None  # no meta.pkl: GPT-2 BPE, as nanoGPT's folder
    tokenizer = AutoTokenizer.from_pretrained(bpe_data)
    assert tokenizer.decode(tokens(bpe_data, "train")[:12].tolist()).startswith("First Citizen:")


def nanogpt_openwebtext(path):
    """nanoGPT's openwebtext recipe, in its own terms, on a local corpus: the expected bins."""
    from datasets import load_dataset

    split = load_dataset("json", data_files=path, split="train").train_test_split(
        test_size=OWT_VAL_FRACTION, seed=OWT_SPLIT_SEED, shuffle=True)
    encoding = gpt2_encoding()
    return {name: np.array([i for text in split[key]["text"] for i in encoding.encode_ordinary(text) + [GPT2_EOT_ID]],
                           dtype=np.uint16)
            for name, key in (("train", "train"), ("val", "test"))}


@pytest.mark.slow
def test_openwebtext_preparer_matches_nanogpts_recipe_on_a_local_corpus(tmp_path):
    corpus = write_jsonl(tmp_path / "owt.jsonl", documents(2500))
    out = tmp_path / "owt"
    run_script("data_prep/openwebtext/prepare.py", f"--source={corpus}", f"--out_dir={out}", "--num_proc=2")
    expected = nanogpt_openwebtext(corpus)
    for split in ("train", "val"):
        np.testing.assert_array_equal(tokens(out, split), expected[split])
    assert np.count_nonzero(tokens(out, "val") == GPT2_EOT_ID) == 2  # ceil(2500 x 0.0005) documents
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no staging left behind


@pytest.mark.slow
@pytest.mark.parametrize("script", ["fineweb_edu", "fineweb"])
def test_the_fineweb_preparers_write_the_openwebtext_preparers_bins_from_fineweb_shaped_parquet(tmp_path, script):
    """FineWeb's columns (text, id, dump, url, ...) in parquet, as the Hub's sample subsets hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = documents(2500)
    corpus = tmp_path / "000_00000.parquet"
    pq.write_table(pa.table({"text": texts, "id": [f"<urn:{i}>" for i in range(len(texts))],
                             "dump": ["CC-MAIN-2024-10"] * len(texts), "token_count": [0] * len(texts)}), corpus)
    out = tmp_path / script
    run_script(f"data_prep/{script}/prepare.py", f"--source={corpus}", f"--out_dir={out}", "--num_proc=2")
    expected = nanogpt_openwebtext(write_jsonl(tmp_path / "same.jsonl", texts))
    for split in ("train", "val"):
        np.testing.assert_array_equal(tokens(out, split), expected[split])


@pytest.mark.slow
def test_an_offline_hub_subset_is_one_line(tmp_path):
    result = run_script("data_prep/fineweb_edu/prepare.py", f"--out_dir={tmp_path / 'fw'}", check=False,
                        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("error: could not load the Hub dataset 'HuggingFaceFW/fineweb-edu' "
                                            "(subset 'sample-10BT') (")
    assert not (tmp_path / "fw").exists()


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_custom_preparer_reads_txt_jsonl_and_parquet(tmp_path, kind):
    texts = documents(300, seed=1)
    if kind == "txt":
        source = tmp_path / "book.txt"
        source.write_text("\n".join(texts), encoding="utf-8")
    elif kind == "jsonl":
        source = write_jsonl(tmp_path / "book.jsonl", texts, column="body")
    else:
        from datasets import Dataset
        source = tmp_path / "book.parquet"
        Dataset.from_dict({"body": texts}).to_parquet(source)
    column = [] if kind == "txt" else ["--text_column=body"]
    out = prepare_corpus([f"--source={source}", f"--out_dir={tmp_path / 'out'}", "--num_proc=1", *column])
    train, val = tokens(out, "train"), tokens(out, "val")
    decode = AutoTokenizer.from_pretrained(out).decode
    if kind == "txt":  # one document, its last 10% is val, nothing appended (nanoGPT's shakespeare split)
        text = "\n".join(texts)
        cut = int(len(text) * 0.9)
        assert decode(train[:-1].tolist()) == text[:cut] and train[-1] == GPT2_EOT_ID
        assert decode(val[:-1].tolist()) == text[cut:]
    else:  # rows are documents: 30 of 300 held out, each ended by <|endoftext|>
        assert np.count_nonzero(val == GPT2_EOT_ID) == 30 and np.count_nonzero(train == GPT2_EOT_ID) == 270
        pieces = decode(np.concatenate([train, val]).tolist()).split("<|endoftext|>")[:-1]
        assert sorted(pieces) == sorted(texts)


def test_char_level_custom_dataset_is_a_nanogpt_char_folder(tmp_path):
    texts = documents(200, seed=2)
    source = write_jsonl(tmp_path / "c.jsonl", texts)
    out = prepare_corpus([f"--source={source}", f"--out_dir={tmp_path / 'c'}", "--tokenizer=char", "--num_proc=1"])
    meta = read_meta(out)
    assert meta["vocab_size"] == len(set("".join(texts))) and list(meta["stoi"]) == sorted(set("".join(texts)))
    tokenizer = AutoTokenizer.from_pretrained(out)
    joined = tokenizer.decode(np.concatenate([tokens(out, "train"), tokens(out, "val")]).tolist())
    assert sorted(joined) == sorted("".join(texts))  # every character of every document, none added


def test_token_ids_beyond_uint16_are_refused_before_anything_is_written(tmp_path):
    many_chars = "".join(chr(0x10000 + i) for i in range(65_537))  # one more than uint16 ids
    source = write_jsonl(tmp_path / "wide.jsonl", [many_chars[:40_000], many_chars[40_000:]])
    message = (f"{source} has 65,537 distinct characters, more token ids than uint16 bins hold (65,536): "
               "use --tokenizer=gpt2")
    with pytest.raises(UserError, match=re.escape(message)):
        prepare_corpus([f"--source={source}", "--tokenizer=char", f"--out_dir={tmp_path / 'wide'}",
                        "--val_fraction=0.5", "--num_proc=1"])
    assert not os.path.exists(tmp_path / "wide")


def test_failed_preparation_leaves_the_existing_dataset_alone(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", documents(50))
    out = prepare_corpus([f"--source={source}", f"--out_dir={tmp_path / 'd'}", "--num_proc=1", "--tokenizer=char"])
    before = {n: sha256(os.path.join(out, n)) for n in os.listdir(out)}
    with pytest.raises(UserError, match="has no column 'body'"):
        prepare_corpus([f"--source={source}", f"--out_dir={out}", "--text_column=body"])
    with pytest.raises(UserError, match="data file .*missing.jsonl not found"):
        prepare_corpus([f"--source={tmp_path / 'missing.jsonl'}", f"--out_dir={out}"])
    assert {n: sha256(os.path.join(out, n)) for n in os.listdir(out)} == before
    # Re-preparing as BPE replaces the char dataset whole: no stale meta.pkl claims a char vocabulary.
    prepare_corpus([f"--source={source}", f"--out_dir={out}", "--num_proc=1"])
    assert read_meta(out) is None and len(AutoTokenizer.from_pretrained(out)) == 50257


def test_a_latin1_jsonl_file_is_one_line_naming_file_line_and_byte(tmp_path, capsys):
    from conftest import one_line_error
    from gpt_train.commands import prepare

    source = tmp_path / "notes.jsonl"
    write_jsonl(source, documents(30))
    lines = source.read_bytes().splitlines(keepends=True)
    lines[11] = json.dumps({"text": "caf\u00e9"}).replace("\\u00e9", "\u00e9").encode("latin-1") + b"\n"
    source.write_bytes(b"".join(lines))
    error = one_line_error(prepare, ["custom", f"--source={source}", f"--out_dir={tmp_path / 'ds'}"], capsys)
    assert f"{source} is not UTF-8 text (line 12, byte 0xe9)" in error and "iconv" in error
    assert not (tmp_path / "ds").exists()


def test_tokenizer_from_gpt2_uses_the_bundled_files_offline(tmp_path, monkeypatch):
    import gpt_train.tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(gpt_train.tokenizer, "pretrained_folder", lambda name, setting: pytest.fail(name))
    source = tmp_path / "notes.jsonl"
    write_jsonl(source, documents(30))
    out = prepare_corpus([f"--source={source}", "--tokenizer_from=gpt2", f"--out_dir={tmp_path / 'ds'}"])
    gpt2 = gpt2_encoding()
    ids = np.fromfile(os.path.join(out, "train.bin"), dtype=np.uint16)
    assert gpt2.decode(ids.tolist()).count("<|endoftext|>") > 0  # GPT-2's ids, read back by GPT-2's encoding
    assert AutoTokenizer.from_pretrained(out).get_vocab() == gpt2_tokenizer().get_vocab()
