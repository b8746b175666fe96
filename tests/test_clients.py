"""Model folders as other programs read them: generate() and pipeline() callers, llama.cpp's
converter (n_ctx), transformers 4.x (tokenizer class and inputs), and folders written before."""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, pipeline

from conftest import TINY_CHECKPOINT_ITER, copy_of, sha256
from gpt_train import checkpoint
from gpt_train.convert import main as convert
from gpt_train.sample import generate_sliding

pytestmark = pytest.mark.slow  # launched processes or lm-eval's task index: the full suite only

CONTEXT = 32  # TINY_MODEL's block_size


@pytest.fixture(scope="module")
def char_folder(tiny_checkpoint, tmp_path_factory):
    return copy_of(tiny_checkpoint, tmp_path_factory, "clients")


def read_json(folder, name):
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def test_generation_obeys_a_callers_max_length_and_stays_inside_the_context(char_folder, capfd):
    model = GPT2LMHeadModel.from_pretrained(char_folder)
    tokenizer = AutoTokenizer.from_pretrained(char_folder)
    prompt = tokenizer("First Citizen:\nBefore we proceed", return_tensors="pt").input_ids  # 32 > CONTEXT // 2
    assert model.generate(prompt[:, :5], max_length=20).shape[1] == 20
    assert model.generate(prompt[:, :5]).shape[1] == CONTEXT  # the default: the whole context, no further
    text = pipeline("text-generation", model=char_folder)(tokenizer.decode(prompt[0, :24]))[0]["generated_text"]
    assert len(text) == CONTEXT  # a prompt longer than half the context: no IndexError
    generation = read_json(char_folder, "generation_config.json")
    assert generation["max_length"] == CONTEXT and "max_new_tokens" not in generation
    assert read_json(char_folder, "config.json")["n_ctx"] == CONTEXT  # llama.cpp's converter reads it
    capfd.readouterr()
    assert generate_sliding(model, prompt[:, :5], max_new_tokens=40).shape[1] == 45  # sample.py's path
    assert "Both `max_new_tokens`" not in capfd.readouterr().err


def test_the_char_tokenizer_names_a_class_and_inputs_transformers_4_knows(char_folder, char_data):
    for folder, max_length in ((char_folder, CONTEXT), (char_data, None)):
        config = read_json(folder, "tokenizer_config.json")
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert config["model_input_names"] == ["input_ids", "attention_mask"]  # no token_type_ids for GPT-2
        if max_length:
            assert config["model_max_length"] == max_length
    # a fresh interpreter with transformers 5 loads it as it was written
    code = ("import sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "e = t('ROMEO:\\nhi'); assert t.decode(e.input_ids) == 'ROMEO:\\nhi' and sorted(e) == "
            "['attention_mask', 'input_ids'], e; print(type(t).__name__, t.model_max_length)")
    result = subprocess.run([sys.executable, "-c", code, char_folder], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-1] == str(CONTEXT)


TRANSFORMERS_4 = "transformers==4.57.1"


@pytest.fixture(scope="session")
def transformers_4():
    """transformers 4.x from the package index in a folder of its own (cached between runs)."""
    target = os.path.join(tempfile.gettempdir(), f"gpt-train-tests-{TRANSFORMERS_4.replace('==', '-')}")
    if not os.path.isdir(target):
        partial = target + f".{os.getpid()}"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-warn-conflicts", "--target", partial,
                        TRANSFORMERS_4], check=True, capture_output=True)
        os.replace(partial, target)
    return target


def test_transformers_4_loads_the_folder_and_samples_from_it(char_folder, transformers_4):
    code = ("import sys, transformers; from transformers import AutoTokenizer, pipeline; "
            "t = AutoTokenizer.from_pretrained(sys.argv[1]); e = t('ROMEO:\\nhi'); "
            "assert t.decode(e['input_ids']) == 'ROMEO:\\nhi' and sorted(e) == ['attention_mask', 'input_ids'], e; "
            "text = pipeline('text-generation', model=sys.argv[1])('ROMEO:')[0]['generated_text']; "
            "print(transformers.__version__, type(t).__name__, t.model_max_length, len(text))")
    result = subprocess.run([sys.executable, "-c", code, char_folder], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": transformers_4})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4.57.1", "PreTrainedTokenizerFast", str(CONTEXT), str(CONTEXT)]


def test_upgrade_rewrites_an_older_folder_in_place_and_its_run_still_resumes(char_folder, tmp_path, capsys):
    old = str(tmp_path / "old")
    subprocess.run(["cp", "-r", char_folder, old], check=True)
    # as gpt-train wrote folders before: max_new_tokens = half the context, no n_ctx, 5.x's class name
    for name, edit in (("generation_config.json", lambda c: (c.pop("max_length"), c.update(max_new_tokens=16))),
                       ("config.json", lambda c: c.pop("n_ctx")),
                       ("tokenizer_config.json", lambda c: (c.update(tokenizer_class="TokenizersBackend"),
                                                            c.pop("model_input_names")))):
        config = read_json(old, name)
        edit(config)
        with open(os.path.join(old, name), "w", encoding="utf-8") as f:
            json.dump(config, f)
    weights = sha256(os.path.join(old, "model.safetensors"))

    convert(["upgrade", old])
    assert capsys.readouterr().out.strip() == \
        f"upgraded {old}: config.json, generation_config.json, tokenizer_config.json"
    for name in ("generation_config.json", "config.json", "tokenizer_config.json"):
        assert read_json(old, name) == read_json(char_folder, name)
    assert sha256(os.path.join(old, "model.safetensors")) == weights
    assert checkpoint.read_trainer_state(old).iter_num == TINY_CHECKPOINT_ITER  # the manifest follows: the run still resumes
    assert not [n for n in os.listdir(old) if n.startswith(".upgrade")]
    convert(["upgrade", old])
    assert capsys.readouterr().out.strip() == f"{old} is up to date"


def test_upgrade_refuses_a_folder_without_a_model_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        convert(["upgrade", str(tmp_path)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} is not a model folder")


def test_a_model_converted_from_nanogpt_gets_the_same_defaults(char_folder, tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    convert(["to-nanogpt", char_folder, ckpt])
    back = str(tmp_path / "back")
    convert(["from-nanogpt", ckpt, back, f"--meta={tmp_path}"])
    assert read_json(back, "config.json")["n_ctx"] == CONTEXT
    assert read_json(back, "generation_config.json")["max_length"] == CONTEXT
    assert read_json(back, "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(back).lm_head.weight,
                               GPT2LMHeadModel.from_pretrained(char_folder).lm_head.weight)
