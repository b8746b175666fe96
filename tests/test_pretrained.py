"""Starting from a pretrained GPT-2: loading, cropping, dropout, shape conflicts, the offline Hub, fine-tuning."""
import os
import time

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import ROOT, TINY_MODEL, read_metrics, run_script
from gpt_train.cli import load_config
from gpt_train.errors import UserError
from gpt_train.train import setup, train

# The tiny "pretrained" model with its own shape: no n_layer/n_embd/block_size given.
RUN = ["--device=cpu", "--compile=False", "--batch_size=4", "--gradient_accumulation_steps=1",
       "--eval_iters=2", "--log_interval=1"]
CLOSED_PORT_HUB = "http://127.0.0.1:9"  # a Hub endpoint where nothing listens: the network is down


def loaded_model(run):
    return run.accelerator.unwrap_model(run.model)


def test_loaded_model_computes_what_was_saved(tiny_gpt2, bpe_data, tmp_path):
    run = setup(load_config([*RUN, f"--init_from={tiny_gpt2}", f"--data_dir={bpe_data}", f"--out_dir={tmp_path}"]))
    assert (run.cfg.n_layer, run.cfg.n_embd, run.cfg.block_size, run.cfg.bias) == (2, 16, 64, True)
    x = torch.randint(50257, (2, 64))
    with torch.no_grad():
        expected = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()(x).logits
        torch.testing.assert_close(loaded_model(run).eval()(x).logits, expected, rtol=0, atol=0)
    assert len(run.tokenizer) == 50257


def test_block_size_is_cropped_and_dropout_overridden(tiny_gpt2, bpe_data, tmp_path):
    run = setup(load_config([*RUN, f"--init_from={tiny_gpt2}", f"--data_dir={bpe_data}", f"--out_dir={tmp_path}",
                             "--block_size=16", "--dropout=0.25"]))
    model = loaded_model(run).eval()
    assert model.transformer.wpe.weight.shape == (16, 16) and model.config.n_positions == 16
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}
    x = torch.randint(50257, (2, 16))
    with torch.no_grad():  # a causal model's first 16 positions do not depend on the rest of the context
        full = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()(x).logits
        torch.testing.assert_close(model(x).logits, full)


@pytest.mark.parametrize("args, message", [
    (["--block_size=128"], "block_size=128 is larger than the 64-token context of"),
    (["--n_layer=4"], "has n_layer=2 but the settings say n_layer=4: drop the n_layer setting"),
    (["--n_embd=64", "--n_head=4"], "has n_head=2 but the settings say n_head=4"),
    (["--bias=False"], "has bias=True but the settings say bias=False"),
])
def test_settings_that_contradict_the_checkpoint_are_refused(tiny_gpt2, bpe_data, tmp_path, args, message):
    with pytest.raises(UserError, match=message):
        setup(load_config([*RUN, f"--init_from={tiny_gpt2}", f"--data_dir={bpe_data}", f"--out_dir={tmp_path}",
                           *args]))


def test_agreeing_explicit_settings_are_accepted(tiny_gpt2, bpe_data, tmp_path):
    run = setup(load_config([*RUN, f"--init_from={tiny_gpt2}", f"--data_dir={bpe_data}", f"--out_dir={tmp_path}",
                             "--n_layer=2", "--n_embd=16", "--n_head=2", "--block_size=64"]))
    assert run.cfg.n_layer == 2


def test_dataset_with_ids_beyond_the_model_vocabulary_is_refused(char_data, tmp_path):
    from transformers import GPT2Config
    folder = tmp_path / "small-vocab"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=8, n_positions=32, vocab_size=40)).save_pretrained(folder)
    with pytest.raises(UserError, match="uses token ids up to 64 but .* has a vocabulary of 40"):
        setup(load_config([*RUN, f"--init_from={folder}", f"--data_dir={char_data}", f"--out_dir={tmp_path}"]))


def test_tiny_finetune_with_the_finetune_preset_and_activation_checkpointing(tiny_gpt2, bpe_data, tmp_path):
    out_dir = str(tmp_path / "ft")
    trained = train(load_config([
        os.path.join(ROOT, "configs", "finetune_shakespeare.py"), *RUN, f"--init_from={tiny_gpt2}",
        f"--data_dir={bpe_data}", f"--out_dir={out_dir}", "--block_size=32", "--learning_rate=1e-2",
        "--max_iters=8", "--eval_interval=4", "--gradient_checkpointing=True"]))
    assert loaded_model(trained).is_activation_checkpointing
    evals = read_metrics(out_dir, "eval")
    assert [e["iter"] for e in evals] == [0, 4, 8]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.5  # from ~ln(50257) = 10.8
    reloaded = GPT2LMHeadModel.from_pretrained(out_dir)  # still a GPT-2 folder, cropped context saved
    assert reloaded.config.n_positions == 32
    assert os.path.isfile(os.path.join(out_dir, "tokenizer_config.json"))


def test_activation_checkpointing_computes_the_same_training_steps(tiny_run):
    out_dir, args = tiny_run
    common = [*args, "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--gradient_accumulation_steps=2"]
    plain = train(load_config([*common, f"--out_dir={out_dir}-plain"]))
    checkpointed = train(load_config([*common, f"--out_dir={out_dir}-ckpt", "--gradient_checkpointing=True"]))
    for a, b in zip(loaded_model(plain).parameters(), loaded_model(checkpointed).parameters(), strict=True):
        torch.testing.assert_close(a, b)


# A cached Hub snapshot under its short name (configs/eval_gpt2.py, init_from='gpt2'): test_readme_walk.py.


@pytest.mark.slow
def test_hub_model_without_network_fails_fast_with_one_line(char_data, tmp_path):
    start = time.monotonic()
    result = run_script("train.py", "--init_from=gpt2-xl", f"--data_dir={char_data}", *TINY_MODEL[5:6], check=False,
                        env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": CLOSED_PORT_HUB})
    assert time.monotonic() - start < 30
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not get openai-community/gpt2-xl (init_from) from the Hugging Face Hub")
    assert lines[0].endswith("download it first with `hf download openai-community/gpt2-xl`, "
                             "or set init_from to a local model folder")


def test_a_folder_that_is_not_a_gpt2_is_refused(bpe_data, tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="holds a 'llama' model; gpt-train trains GPT-2"):
        setup(load_config([*RUN, f"--init_from={folder}", f"--data_dir={bpe_data}", f"--out_dir={tmp_path}"]))
