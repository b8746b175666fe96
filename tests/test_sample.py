"""Model folders in the Hugging Face ecosystem, and sample.py on char-level and GPT-2 BPE models."""
import io
import json
import math
import os
import time

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_CHECKPOINT_ITER, TINY_MODEL, one_line_error, run_script
from gpt_train.cli import load_config
from gpt_train.errors import UserError
from gpt_train.model import PADDED_GPT2_VOCAB, build_model
from gpt_train.sample import main as sample_main
from gpt_train.sample import SEPARATOR, SampleConfig, generate_sliding, model_source, sample
from gpt_train.tokenizer import gpt2_tokenizer

BLOCK = 32  # TINY_MODEL's context


@pytest.fixture(scope="module")
def char_model(tiny_checkpoint):
    """A tiny char-level model trained by train.py, as out_dir holds it (sampling reads, never writes it)."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A tiny scratch GPT-2 with the GPT-2 BPE tokenizer, saved as train.py saves one."""
    folder = str(tmp_path_factory.mktemp("bpe"))
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    build_model(load_config(TINY_MODEL), PADDED_GPT2_VOCAB, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def draw(folder, *args, init_from="resume"):
    """sample.py's printed output and returned texts for these settings, run in-process."""
    out = io.StringIO()
    cfg = load_config([f"--out_dir={folder}", f"--init_from={init_from}", "--device=cpu", *args], SampleConfig)
    texts = sample(cfg, out)
    return out.getvalue(), texts


@pytest.mark.slow
def test_pipeline_loads_both_model_folders_offline_in_a_fresh_interpreter_without_warnings(char_model, bpe_model):
    code = ("import sys; from transformers import pipeline\n"
            "for folder in sys.argv[1:]:\n"
            "    print(repr(pipeline('text-generation', model=folder)('ROMEO:', max_length=16)[0]['generated_text']))\n")
    result = run_script("-c", code, char_model, bpe_model, env={"HF_HUB_OFFLINE": "1"})
    char_text, bpe_text = [eval(line) for line in result.stdout.splitlines()]
    assert char_text.startswith("ROMEO:") and len(char_text) == 16  # no early stop on a char model
    assert bpe_text.startswith("ROMEO:")
    # nothing from transformers at all (its messages start "[transformers]"; none says "warn")
    assert "warn" not in result.stderr.lower() and "[transformers]" not in result.stderr, result.stderr


def test_auto_classes_load_folders_with_sensible_generation_defaults(char_model, bpe_model):
    char = AutoModelForCausalLM.from_pretrained(char_model)
    g = char.generation_config
    assert (g.do_sample, g.temperature, g.top_k) == (True, 0.8, 200)  # nanoGPT's sample.py
    assert g.eos_token_id is None and g.pad_token_id is None and char.config.eos_token_id is None
    assert g.max_length == BLOCK and g.max_new_tokens is None  # the context: tests/test_clients.py
    tokenizer = AutoTokenizer.from_pretrained(char_model)
    assert tokenizer.decode(tokenizer("O Romeo, Romeo!\n")["input_ids"]) == "O Romeo, Romeo!\n"
    bpe = AutoModelForCausalLM.from_pretrained(bpe_model)
    assert bpe.generation_config.eos_token_id == bpe.generation_config.pad_token_id == 50256
    assert AutoTokenizer.from_pretrained(bpe_model)("Hello world")["input_ids"] == [15496, 995]


def test_model_card_names_dataset_progress_and_settings(char_model):
    with open(os.path.join(char_model, "training_state", "trainer_state.json")) as f:
        state = json.load(f)
    card = ModelCard.load(os.path.join(char_model, "README.md"))
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "| dataset | `shakespeare_char` |" in card.text  # the --data_dir folder the bins came from
    assert state["iter_num"] == TINY_CHECKPOINT_ITER and f"| iteration | {state['iter_num']:,} |" in card.text
    assert f"| tokens seen | {state['tokens_seen']:,} |" in card.text
    assert state["tokens_seen"] == TINY_CHECKPOINT_ITER * 4 * BLOCK  # iterations of 1 x 4 x 32
    bits = state["best_val_loss"] / math.log(2) / state["val_bytes_per_token"]  # ASCII characters: 1 byte each
    assert state["val_bytes_per_token"] == 1.0
    assert f"| best val loss of the run | {state['best_val_loss']:.4f} ({bits:.4f} bits per byte of val text), at " \
           f"iteration {state['best_iter']} |" in card.text
    assert f"| val loss of these weights | {state['val_loss']:.4f} |" in card.text
    settings = json.loads(card.text.split("```json")[1].split("```")[0])
    assert settings == state["config"] and settings["n_embd"] == 32


def test_same_seed_same_samples_and_streaming_prints_what_is_returned(char_model):
    common = ["--start=ROMEO:", "--num_samples=2", "--max_new_tokens=20"]
    printed, texts = draw(char_model, *common, "--seed=7")
    _, again = draw(char_model, *common, "--seed=7", "--stream=False")
    _, other = draw(char_model, *common, "--seed=8")
    assert texts == again and texts != other and texts[0] != texts[1]
    assert printed == "".join(t + "\n" + SEPARATOR + "\n" for t in texts)
    assert all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 20 for t in texts)


def test_top_k_1_and_tiny_top_p_sample_the_greedy_text(char_model, bpe_model):
    common = ["--start=ROMEO:", "--num_samples=1", "--max_new_tokens=12"]
    for folder in (bpe_model, char_model):
        _, greedy = draw(folder, *common, "--temperature=0")
        _, top_k = draw(folder, *common, "--top_k=1", "--temperature=1.5", "--seed=3")
        assert greedy == top_k
    # greedy is the char model's now
    _, top_p = draw(char_model, *common, "--top_k=0", "--top_p=1e-9", "--temperature=1.5", "--seed=4")
    _, free = draw(char_model, *common, "--top_k=0", "--temperature=1.5", "--seed=3")
    assert top_p == greedy and free != greedy


def test_file_prompt_is_read_and_continued(char_model, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:\nO Romeo")
    _, texts = draw(char_model, f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=5")
    assert texts[0].startswith("JULIET:\nO Romeo") and len(texts[0]) == len("JULIET:\nO Romeo") + 5


def test_generation_runs_past_the_context_with_a_sliding_window(char_model, bpe_model):
    _, texts = draw(char_model, "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=100")
    assert len(texts[0]) == len("ROMEO:") + 100  # three times the 32-token context
    _, texts = draw(bpe_model, "--start=" + "Hello " * 40, "--num_samples=1",
                    "--max_new_tokens=10", init_from=bpe_model)
    assert texts[0].startswith("Hello " * 40)  # the prompt alone overflows the context


def test_sliding_window_conditions_each_token_on_at_most_the_last_block(char_model):
    """Greedy generate_sliding against a full forward per token over the window it documents."""
    model = AutoModelForCausalLM.from_pretrained(char_model).eval()
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    out = generate_sliding(model, prompt, 70, do_sample=False)
    keep = BLOCK - BLOCK // 4
    ids, start = prompt[0].tolist(), 0
    while len(ids) < 5 + 70:
        if len(ids) - start == BLOCK:  # the window is full: slide to the last `keep` tokens
            start = len(ids) - keep
        with torch.no_grad():
            logits = model(torch.tensor([ids[start:]])).logits
        ids.append(int(logits[0, -1].argmax()))
    assert out[0].tolist() == ids
    first = model.generate(prompt, max_new_tokens=BLOCK - 5, do_sample=False)  # within the context:
    assert out[0, :BLOCK].tolist() == first[0].tolist()                      # plain generate, cache and all


def test_model_sources():
    cfg = load_config(["--init_from=gpt2-xl"], SampleConfig)
    assert model_source(cfg) == "openai-community/gpt2-xl"
    assert model_source(load_config(["--init_from=someone/model"], SampleConfig)) == "someone/model"


def test_sample_py_mistake_is_a_one_line_error(char_model, capsys):
    error = one_line_error(sample_main, [f"--out_dir={char_model}", "--start=FILE:/nonexistent/prompt.txt"], capsys)
    assert error.startswith("error: cannot read the prompt file /nonexistent/prompt.txt")


@pytest.mark.parametrize("args, message", [
    (["--out_dir=/nonexistent/out"], "/nonexistent/out does not exist: train a model first"),
    (["--out_dir=configs"], "configs is not a model folder (config.json, model.safetensors missing)"),
    (["--init_from=/nonexistent/model"], "cannot load a model from '/nonexistent/model'"),
    (["--top_p=1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--temperature=-1"], "temperature must not be negative"),
    (["--num_sampels=2"], "unknown setting 'num_sampels' in the command line; did you mean num_samples?"),
])
def test_sample_mistakes_are_user_errors(char_model, args, message):
    with pytest.raises(UserError) as raised:
        sample(load_config([f"--out_dir={char_model}", "--device=cpu", *args], SampleConfig), io.StringIO())
    assert str(raised.value).startswith(message), raised.value


def test_characters_outside_a_char_vocabulary_are_named(char_model):
    with pytest.raises(UserError, match="vocabulary has no '€'"):
        draw(char_model, "--start=ROMEO€:", "--num_samples=1")


def test_a_pipeline_reads_a_character_a_char_vocabulary_lacks_as_a_question_mark(char_model):
    """tokenizers would raise "Missing [UNK] token"; the vocabulary and the decoding stay as they were."""
    from transformers import pipeline

    generate = pipeline("text-generation", model=char_model, device="cpu")
    tokenizer = generate.tokenizer
    assert tokenizer("Café")["input_ids"] == tokenizer("Caf?")["input_ids"]
    assert tokenizer.unk_token is None and len(tokenizer) == 65  # no token added, nothing decoding skips
    assert tokenizer.decode(tokenizer("Why? No.")["input_ids"], skip_special_tokens=True) == "Why? No."
    greedy = {"max_new_tokens": 8, "do_sample": False, "return_full_text": False}
    assert generate("Café", **greedy)[0]["generated_text"] == generate("Caf?", **greedy)[0]["generated_text"]


@pytest.mark.slow
def test_sampling_a_hub_model_without_network_fails_fast_with_one_line(tmp_path):
    from test_pretrained import CLOSED_PORT_HUB
    start = time.monotonic()
    result = run_script("sample.py", "--init_from=gpt2", "--num_samples=1", check=False,
                        env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": CLOSED_PORT_HUB})
    assert time.monotonic() - start < 30
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: could not get openai-community/gpt2 (init_from) from the Hugging Face Hub")
