"""Model folders as GGUF files for llama.cpp (`convert to-gguf`): read back with `gguf`, the format's
own library, into a GPT-2 with the same logits, and a vocabulary that llama.cpp's BPE reads to the
folder tokenizer's ids. With llama.cpp at hand ($LLAMA_CPP_BIN, an earlier build, or
GPT_TRAIN_BUILD_LLAMA_CPP=1 to build it from source: 4-10 minutes on 2 cores, too long for every
CI run) llama.cpp itself tokenizes and scores text as gpt-train does."""
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import gguf
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import ROOT, TINY_MODEL, one_line_error, tree_digest
from gpt_train.commands import train
from gpt_train.convert import main as convert
from gpt_train.gguf_export import CONV1D_WEIGHTS, byte_level
from gpt_train.commands import prepare
from gpt_train.tokenizer import char_tokenizer, save_tokenizer

SHAKESPEARE = os.path.join(ROOT, "data_prep", "tinyshakespeare", "input.txt")
MIXED_TEXT = "Café naïve Ωμέγα, 日本語の文章。 Emoji 🎉👩‍👩‍👧 and tabs\tand\r\nnewlines 's 'll  "
EXACT = 1e-5  # f32 weights: the same numbers
# f16 keeps 11 significant bits and q8_0 8 bits per block of 32: the tiny models' logits (about 1
# in size) move by about these much
ROUNDED = {"f16": 5e-3, "bf16": 4e-2, "q8_0": 4e-2}


def trained(data_dir, out_dir):
    train([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL, "--max_iters=2", "--eval_interval=2",
           "--eval_iters=1"])
    return out_dir


@pytest.fixture(scope="module")
def folders(char_data, tiny_gpt2, tmp_path_factory):
    """Every kind of folder gpt-train makes: a trained char model and own-BPE model (500 tokens,
    padded to 512), the GPT-2-vocabulary folder it fine-tunes, and a char vocabulary with
    characters of two, three and four UTF-8 bytes."""
    root = tmp_path_factory.mktemp("gguf")
    own_data = root / "own_data"
    prepare(["custom", f"--source={SHAKESPEARE}", f"--out_dir={own_data}", "--tokenizer=bpe", "--vocab_size=500"])
    wide = str(root / "wide")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        chars = sorted(set(f.read()[:5000] + MIXED_TEXT))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(chars),
                        activation_function="gelu_new", bos_token_id=None, eos_token_id=None)
    GPT2LMHeadModel(config).save_pretrained(wide)
    save_tokenizer(char_tokenizer({ch: i for i, ch in enumerate(chars)}), wide, context=64)
    return {"char": trained(char_data, str(root / "char")), "own_bpe": trained(str(own_data), str(root / "own")),
            "gpt2": tiny_gpt2, "wide_char": wide}


def to_gguf(folder, tmp_path, *options):
    path = str(tmp_path / "model.gguf")
    convert(["to-gguf", folder, path, "--force", *options])  # each call replaces the last one's file
    return path


def fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items()}


def model_from_gguf(path, activation_function):
    """A GPT2LMHeadModel built from the GGUF alone: llama.cpp's keys, tensor names and layouts undone."""
    reader, kv = fields(path)
    stored = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        tuple(int(n) for n in reversed(t.shape))).copy()) for t in reader.tensors}
    config = GPT2Config(vocab_size=len(kv["tokenizer.ggml.tokens"]), n_positions=kv["gpt2.context_length"],
                        n_embd=kv["gpt2.embedding_length"], n_layer=kv["gpt2.block_count"],
                        n_head=kv["gpt2.attention.head_count"], n_inner=kv["gpt2.feed_forward_length"],
                        layer_norm_epsilon=kv["gpt2.attention.layer_norm_epsilon"],
                        activation_function=activation_function, bos_token_id=None, eos_token_id=None,
                        tie_word_embeddings="output.weight" not in stored)
    model = GPT2LMHeadModel(config).eval()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    state, read = {}, set()
    for name in model.state_dict():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if name == "lm_head.weight" and gguf_name not in stored:  # tied: llama.cpp reuses token_embd
            gguf_name = "token_embd.weight"
        read.add(gguf_name)
        tensor = stored[gguf_name]
        state[name] = tensor.T.contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor
    assert read == set(stored), f"tensors no GPT-2 weight reads: {sorted(set(stored) - read)}"
    model.load_state_dict(state, strict=True)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["char", "own_bpe", "gpt2", "wide_char"])
def test_every_kind_of_folder_becomes_a_gpt2_gguf_with_its_vocabulary_and_context(folders, kind, tmp_path,
                                                                                  capsys):
    folder = folders[kind]
    path = to_gguf(folder, tmp_path, "--outtype=f32")
    assert capsys.readouterr().out.strip().endswith(f"wrote {path}")
    reader, kv = fields(path)
    config = GPT2Config.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert kv["general.architecture"] == "gpt2" and kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.pre"] == "gpt-2"  # a name llama.cpp knows: no hash of known vocabularies
    assert kv["gpt2.context_length"] == config.n_positions and kv["gpt2.block_count"] == config.n_layer
    assert (kv["gpt2.embedding_length"], kv["gpt2.feed_forward_length"]) == (config.n_embd, 4 * config.n_embd)
    assert kv["gpt2.attention.head_count"] == config.n_head
    assert kv["gpt2.attention.layer_norm_epsilon"] == pytest.approx(config.layer_norm_epsilon)
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # ggml order: the row length first
    assert shapes["token_embd.weight"] == [config.n_embd, config.vocab_size]
    assert shapes["position_embd.weight"] == [config.n_embd, config.n_positions]
    assert shapes["blk.1.attn_qkv.weight"] == [config.n_embd, 3 * config.n_embd]  # nn.Linear's, not Conv1D's
    assert shapes["blk.1.ffn_up.weight"] == [config.n_embd, 4 * config.n_embd]
    assert shapes["blk.1.ffn_down.weight"] == [4 * config.n_embd, config.n_embd]
    assert "output.weight" not in shapes and len(shapes) == 4 + 12 * config.n_layer  # tied: token_embd serves

    vocab = tokenizer.get_vocab()
    by_id = {i: (byte_level(t) if kind.endswith("char") else t) for t, i in vocab.items()}
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == config.vocab_size
    assert tokens[:len(vocab)] == [by_id[i] for i in range(len(vocab))]
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), config.vocab_size)]
    assert types[len(vocab):] == [gguf.TokenType.UNUSED] * (config.vocab_size - len(vocab))
    merges = kv["tokenizer.ggml.merges"]
    if kind.endswith("char"):
        assert kv["tokenizer.ggml.eos_token_id"] == vocab["\n"]  # llama.cpp wants one: the line's end
        multibyte = [ch for ch in vocab if len(ch.encode()) > 1]
        assert len(merges) == max(1, len({ch.encode()[:k] for ch in multibyte for k in range(2, len(ch.encode()) + 1)}))
    else:
        assert kv["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id == kv["tokenizer.ggml.bos_token_id"]
        assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
        assert len(merges) == len(json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"])
        assert len(merges) == {"gpt2": 50000, "own_bpe": 500 - 256 - 1}[kind]
    assert kv["tokenizer.ggml.add_bos_token"] is False


def llama_cpp_bpe(path):
    """The GGUF's vocabulary read as llama.cpp reads a "gpt2" one with pre-tokenizer "gpt-2": GPT-2's
    regex, bytes, then the merges by rank; `tokenizers`' BPE does the same, given the intermediate
    pieces of the merges (llama.cpp needs only the final ones: they get ids past the vocabulary)."""
    _, kv = fields(path)
    vocab = {token: i for i, token in enumerate(kv["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in kv["tokenizer.ggml.merges"]]
    for piece in (p for pair in merges for p in (*pair, "".join(pair))):
        vocab.setdefault(piece, len(vocab))
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    return bpe


@pytest.mark.parametrize("kind", ["char", "own_bpe", "gpt2", "wide_char"])
def test_the_gguf_vocabulary_reads_text_to_the_folders_ids(folders, kind, tmp_path):
    folder = folders[kind]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bpe = llama_cpp_bpe(to_gguf(folder, tmp_path))
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()[:3000]
    texts = [text, text[:200] + MIXED_TEXT] if kind != "char" else [text]  # Shakespeare's chars lack "é"
    for sample in texts:
        expected = tokenizer(sample, add_special_tokens=False)["input_ids"]
        assert bpe.encode(sample).ids == expected
        assert bpe.decode(expected) == sample


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_the_weights_read_back_from_the_gguf_give_the_models_logits(folders, outtype, tmp_path):
    folder = folders["own_bpe"]
    original = GPT2LMHeadModel.from_pretrained(folder).eval()
    path = to_gguf(folder, tmp_path, f"--outtype={outtype}")
    reader, kv = fields(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == outtype.upper() and types["token_embd.weight"] == outtype.upper()
    assert types["position_embd.weight"] == types["blk.0.attn_norm.weight"] == types["blk.0.attn_qkv.bias"] == "F32"
    rebuilt = model_from_gguf(path, original.config.activation_function)
    ids = torch.randint(original.config.vocab_size, (2, original.config.n_positions))
    difference = (logits(rebuilt, ids) - logits(original, ids)).abs().max().item()
    assert difference < (EXACT if outtype == "f32" else ROUNDED[outtype]), difference


def test_every_kind_converts_with_its_weights_and_untied_output(folders, tmp_path):
    for kind in ("char", "gpt2", "wide_char"):
        original = GPT2LMHeadModel.from_pretrained(folders[kind]).eval()
        rebuilt = model_from_gguf(to_gguf(folders[kind], tmp_path, "--outtype=f32"),
                                  original.config.activation_function)
        ids = torch.randint(original.config.vocab_size, (2, 16))
        assert (logits(rebuilt, ids) - logits(original, ids)).abs().max() < EXACT, kind
    untied = str(tmp_path / "untied")
    original = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=64,
                                          tie_word_embeddings=False)).eval()
    original.save_pretrained(untied)
    save_tokenizer(char_tokenizer({chr(32 + i): i for i in range(64)}), untied)
    path = to_gguf(untied, tmp_path, "--outtype=f32")
    assert "output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    ids = torch.randint(64, (1, 16))
    assert (logits(model_from_gguf(path, "gelu_new"), ids) - logits(original, ids)).abs().max() < EXACT


def test_the_default_name_sits_beside_the_folder_and_only_force_replaces_a_file(folders, tmp_path, capsys):
    folder = str(tmp_path / "out-char")
    shutil.copytree(folders["char"], folder)
    convert(["to-gguf", folder])
    out = capsys.readouterr().out
    expected = str(tmp_path / "out-char-f16.gguf")
    assert out.splitlines()[-1] == f"wrote {expected}" and "note: a char vocabulary has no end-of-text" in out
    assert "note: the model computes exact GELU" in out  # gpt-train trains with nanoGPT's exact GELU
    first = os.path.getsize(expected)
    convert(["to-gguf", folder, str(tmp_path), "--outtype=f32"])  # a folder: the default name inside it
    assert os.path.getsize(tmp_path / "out-char-f32.gguf") > first
    with open(expected, "wb") as f:
        f.write(b"an older file")
    assert one_line_error(convert, ["to-gguf", folder], capsys) == (
        f"error: {expected} exists: replace it with --force, or give another GGUF_FILE")
    assert open(expected, "rb").read() == b"an older file"
    convert(["to-gguf", folder, "--force"])
    assert os.path.getsize(expected) == first and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_no_file_of_a_run_and_no_unrelated_file_is_overwritten_and_no_folder_is_made(folders, tiny_checkpoint,
                                                                                   tmp_path, capsys):
    run = str(tmp_path / "out-run")
    shutil.copytree(tiny_checkpoint, run)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    before = tree_digest(run)
    for target in ("model.safetensors", "config.json", "training_state"):
        for force in ([], ["--force"]):  # the run's own files: not even with --force
            error = one_line_error(convert, ["to-gguf", run, os.path.join(run, target), *force], capsys)
            assert "is one of the files of the model folder" in error or "is not a file" in error, error
    assert tree_digest(run) == before
    assert "notes.txt exists: replace it with --force" in one_line_error(convert, ["to-gguf", run, str(notes)], capsys)
    assert notes.read_text() == "mine"
    missing = tmp_path / "nonexistent" / "dir" / "x.gguf"
    assert "does not exist; create it first" in one_line_error(convert, ["to-gguf", run, str(missing)], capsys)
    assert not (tmp_path / "nonexistent").exists()


def test_a_conversion_that_fails_midway_leaves_no_file(folders, tmp_path, capsys, monkeypatch):
    from gpt_train import gguf_export

    def broken(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf_export, "_add_tensors", broken)
    with pytest.raises(OSError):
        convert(["to-gguf", folders["char"], str(tmp_path / "x.gguf")])
    assert os.listdir(tmp_path) == []  # neither x.gguf nor its temporary


def test_what_is_no_gpt2_folder_is_refused_in_one_line(tmp_path, capsys):
    assert one_line_error(convert, ["to-gguf", str(tmp_path)], capsys).startswith(
        f"error: {tmp_path} is not a model folder")
    llama = str(tmp_path / "llama")
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=64)).save_pretrained(llama)
    assert one_line_error(convert, ["to-gguf", llama], capsys) == (
        f"error: {llama} holds a 'llama' model, not GPT-2: convert it with llama.cpp's convert_hf_to_gguf.py, "
        "which knows many architectures")
    relu = str(tmp_path / "relu")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50257,
                               activation_function="relu")).save_pretrained(relu)
    assert "computes GELU only" in one_line_error(convert, ["to-gguf", relu], capsys)
    assert "--outtype" in one_line_error(convert, ["to-gguf", relu, "--outtype=q4_0"], capsys)
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".gguf", ".tmp"))]


# llama.cpp as llama-cpp-python's source distribution carries it (llama.cpp 0c1e570, whose gguf-py is
# the gguf 0.19.0 pinned here): the package index is the one place this machine reaches that has it
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_CPP_TOOLS = ("llama-tokenize", "llama-perplexity")


@pytest.fixture(scope="session")
def llama_cpp_bin(tmp_path_factory):
    """A folder with llama.cpp's llama-tokenize and llama-perplexity: $LLAMA_CPP_BIN, an earlier build, or
    built from source when GPT_TRAIN_BUILD_LLAMA_CPP=1 (cached between runs). Skips otherwise."""
    if os.environ.get("LLAMA_CPP_BIN"):
        return os.environ["LLAMA_CPP_BIN"]
    target = os.path.join(tempfile.gettempdir(), f"gpt-train-tests-{LLAMA_CPP_PYTHON.replace('==', '-')}")
    if os.path.isdir(target):
        return target
    if os.environ.get("GPT_TRAIN_BUILD_LLAMA_CPP") != "1":
        pytest.skip("no llama.cpp: set LLAMA_CPP_BIN to its binaries, or GPT_TRAIN_BUILD_LLAMA_CPP=1 to build it")
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        pytest.skip("llama.cpp cannot be built here: cmake and a C++ compiler are needed")
    work = tmp_path_factory.mktemp("llama.cpp")
    download = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               "-d", str(work), LLAMA_CPP_PYTHON], capture_output=True, text=True)
    if download.returncode != 0:
        pytest.skip(f"{LLAMA_CPP_PYTHON} could not be downloaded: {download.stderr.strip()[-300:]}")
    with tarfile.open(next(work.glob("*.tar.gz"))) as archive:
        archive.extractall(work, filter="data")
    source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    build = work / "build"
    steps = [["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
              "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=OFF"],
             ["cmake", "--build", str(build), "--target", *LLAMA_CPP_TOOLS, "-j", str(os.cpu_count())]]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        assert result.returncode == 0, f"building llama.cpp failed: {(result.stdout + result.stderr)[-3000:]}"
    partial = target + f".{os.getpid()}"
    os.makedirs(partial)
    for tool in LLAMA_CPP_TOOLS:  # linked statically: they run from anywhere
        shutil.copy2(build / "bin" / tool, partial)
    os.replace(partial, target)
    return target


def llama_cpp(folder, tool, *args):
    result = subprocess.run([os.path.join(folder, tool), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def our_perplexity(folder, ids, context):
    """llama-perplexity's measure: the text in chunks of `context` tokens, each scored on its second
    half (every token predicted from at least half a context), no BOS in front."""
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    first, nll, count = context // 2, 0.0, 0
    for start in range(0, len(ids) // context * context, context):
        chunk = torch.tensor([ids[start:start + context]])
        log_probs = torch.log_softmax(logits(model, chunk)[0].double(), dim=-1)
        targets = chunk[0, first + 1:]
        nll -= log_probs[first:context - 1].gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return math.exp(nll / count)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "own_bpe", "gpt2", "wide_char"])
def test_llama_cpp_tokenizes_and_scores_the_text_as_gpt_train_does(folders, kind, llama_cpp_bin, tmp_path):
    folder = folders[kind]
    path = to_gguf(folder, tmp_path, "--outtype=f32")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()[:4000] + ("" if kind == "char" else MIXED_TEXT)
    sample = tmp_path / "sample.txt"
    sample.write_text(text, encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    theirs = llama_cpp(llama_cpp_bin, "llama-tokenize", "-m", path, "-f", str(sample), "--ids", "--log-disable",
                       "--no-bos")
    assert json.loads(theirs.strip().splitlines()[-1]) == ids
    context = GPT2Config.from_pretrained(folder).n_positions
    report = llama_cpp(llama_cpp_bin, "llama-perplexity", "-m", path, "-f", str(sample), "-c", str(context),
                       "-b", str(context), "-t", "2")
    measured = float(report.split("Final estimate: PPL = ")[1].split()[0])
    # llama.cpp computes GPT-2's tanh GELU and the trained ones exact GELU: near, not equal (1e-6 apart here)
    assert measured == pytest.approx(our_perplexity(folder, ids, context), rel=1e-3)


def test_a_chat_folders_template_goes_into_the_gguf_and_the_context_is_printed(folders, tmp_path, capsys):
    from gpt_train.chat import DEFAULT_TEMPLATE

    chat = str(tmp_path / "out-chat")
    shutil.copytree(folders["gpt2"], chat)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    tokenizer.chat_template = DEFAULT_TEMPLATE  # what a chat fine-tune's folder carries (chat_template.jinja)
    tokenizer.save_pretrained(chat)
    path = to_gguf(chat, tmp_path)
    _, values = fields(path)
    assert values["tokenizer.chat_template"] == DEFAULT_TEMPLATE  # what llama.cpp's chat path applies
    context = GPT2Config.from_pretrained(chat).n_positions
    assert f"note: the model knows {context} positions (learned, not extended): run llama.cpp with -c {context}" \
        in capsys.readouterr().out
    assert "tokenizer.chat_template" not in fields(to_gguf(folders["char"], tmp_path))[1]  # none: none written
