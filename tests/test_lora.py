"""finetune_method='lora': peft's adapters on a model trained here, only they trained; a merged
plain folder and the adapter beside it, each loadable without gpt-train; exact resume; DDP equal
to one process; refusals in one line."""
import json
import os
import shutil

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel, pipeline

from conftest import ACCELERATE, ROOT, TINY_MODEL, forget_the_run, free_port, read_metrics, run_script, sha256, \
    torch_threads
from gpt_train import push
from gpt_train.cli import load_config
from gpt_train.errors import UserError
from gpt_train.train import train

LORA = ["--finetune_method=lora", "--lora_r=4", "--lora_alpha=8", "--lora_dropout=0.1", "--learning_rate=1e-2",
        "--min_lr=1e-3", "--warmup_iters=2"]
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.fixture(scope="module")
def base(char_data, tmp_path_factory):
    """A tiny char model trained here: the "pretrained" model the adapters adapt."""
    folder = str(tmp_path_factory.mktemp("base") / "out")
    train(load_config([f"--data_dir={char_data}", f"--out_dir={folder}", *TINY_MODEL, "--max_iters=20",
                       "--eval_interval=20", "--eval_iters=1"]))
    forget_the_run()
    return folder


def lora_args(char_data, base, out_dir, *extra):
    return [f"--data_dir={char_data}", f"--init_from={base}", f"--out_dir={out_dir}", *TINY_MODEL, *LORA,
            "--eval_interval=4", "--eval_iters=2", *extra]


def test_lora_trains_only_the_adapters_and_leaves_a_merged_folder_and_a_peft_adapter(char_data, base, tmp_path,
                                                                                     capsys):
    out_dir = str(tmp_path / "lora")
    run = train(load_config(lora_args(char_data, base, out_dir, "--max_iters=8")))
    printed = capsys.readouterr().out
    model = run.accelerator.unwrap_model(run.model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {name.split(".")[5] + "." + name.split(".")[6] for name in trainable} == set(TARGETS)
    # the optimizer holds the adapters alone: its state is a sliver of full fine-tuning's
    optimized = sum(p.numel() for group in run.optimizers[0].param_groups for p in group["params"])
    assert optimized == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"LoRA trains {optimized:,} of " in printed

    # out_dir: a plain GPT-2 folder of the merged weights; adapter/: peft's folder, naming its base
    with open(os.path.join(out_dir, "adapter", "adapter_config.json")) as f:
        adapter_config = json.load(f)
    assert adapter_config["base_model_name_or_path"] == os.path.abspath(base) and adapter_config["r"] == 4
    merged = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    plain = GPT2LMHeadModel.from_pretrained(base)
    adapted = PeftModel.from_pretrained(plain, os.path.join(out_dir, "adapter")).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(os.path.join(out_dir, "adapter")).eval()  # finds the base alone
    x = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        expected = adapted(input_ids=x).logits
        torch.testing.assert_close(merged(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(auto(input_ids=x).logits, expected, atol=0, rtol=0)
    frozen, changed = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(out_dir,
                                                                                                 "model.safetensors"))
    assert torch.equal(frozen["transformer.wte.weight"], changed["transformer.wte.weight"])
    assert not torch.equal(frozen["transformer.h.0.attn.c_attn.weight"], changed["transformer.h.0.attn.c_attn.weight"])
    assert set(frozen) == set(changed)  # no adapter tensor in the plain folder
    text = pipeline("text-generation", model=out_dir, device="cpu")("ROMEO:", max_new_tokens=10)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_a_lora_run_resumes_exactly(char_data, base, tmp_path, capsys):
    """lora_dropout on: the same losses and a byte-identical adapter prove the RNGs came back too."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(load_config(lora_args(char_data, base, straight, "--max_iters=8")))
    forget_the_run()
    train(load_config(lora_args(char_data, base, resumed, "--max_iters=4")))
    forget_the_run()
    capsys.readouterr()
    train(load_config(lora_args(char_data, base, resumed, "--max_iters=8", "--init_from=resume")))
    assert "resuming from iteration 4" in capsys.readouterr().out
    losses = {e["iter"]: e["train/step_loss"] for e in read_metrics(resumed, "train")}
    assert losses == {e["iter"]: e["train/step_loss"] for e in read_metrics(straight, "train")}
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        assert sha256(os.path.join(resumed, name)) == sha256(os.path.join(straight, name)), name


def test_a_lora_run_pushes_the_merged_model_and_its_adapter_never_a_linked_adapter(char_data, base, tmp_path,
                                                                                   hub, capsys):
    out_dir = str(tmp_path / "lora")
    train(load_config(lora_args(char_data, base, out_dir, "--max_iters=4", "--push_to_hub=True",
                                "--hub_model_id=someone/lora", "--hub_strategy=end")))
    (upload,) = hub.uploads()
    adapter = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md"}
    assert adapter <= set(upload[3]) and {"config.json", "model.safetensors"} <= set(upload[3])
    with open(os.path.join(out_dir, "adapter", "adapter_model.safetensors"), "rb") as f:
        assert upload[3]["adapter/adapter_model.safetensors"] == f.read()
    # adapter/ replaced by a link to a folder outside out_dir: none of its files go up
    outside = tmp_path / "elsewhere"
    shutil.move(os.path.join(out_dir, "adapter"), outside)
    os.symlink(outside, os.path.join(out_dir, "adapter"))
    push.main([out_dir, "someone/lora"])
    assert not [name for name in hub.uploads()[-1][3] if name.startswith("adapter/")]


def lora_run_on_a_copy(char_data, base, tmp_path):
    """(the base's copy, the out_dir of a LoRA run of 4 iterations on it)."""
    moved = str(tmp_path / "base")
    shutil.copytree(base, moved)
    out_dir = str(tmp_path / "lora")
    train(load_config(lora_args(char_data, moved, out_dir, "--max_iters=4")))
    forget_the_run()
    return moved, out_dir


def test_a_resume_refuses_a_base_that_changed_since(char_data, base, tmp_path):
    moved, out_dir = lora_run_on_a_copy(char_data, base, tmp_path)
    weights = load_file(os.path.join(moved, "model.safetensors"))
    weights["transformer.h.0.attn.c_attn.weight"] += 0.01  # the base folder trained on, say
    save_file(weights, os.path.join(moved, "model.safetensors"), metadata={"format": "pt"})
    before = sha256(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))
    with pytest.raises(UserError, match=f"{moved} is not the model the adapter in {out_dir} was trained on "
                                        r"\(transformer.h.0.attn.c_attn.weight differs"):
        train(load_config(lora_args(char_data, moved, out_dir, "--max_iters=8", "--init_from=resume")))
    assert sha256(os.path.join(out_dir, "adapter", "adapter_model.safetensors")) == before


def test_a_run_folder_copied_with_its_base_to_another_place_loads_in_peft_and_resumes_there(char_data, base,
                                                                                             tmp_path):
    moved, out_dir = lora_run_on_a_copy(char_data, base, tmp_path)
    new_base, new_run = str(tmp_path / "elsewhere" / "base"), str(tmp_path / "elsewhere" / "lora")
    shutil.copytree(moved, new_base)
    shutil.copytree(out_dir, new_run)
    shutil.rmtree(moved)  # the first machine is gone: its absolute path names nothing
    shutil.rmtree(out_dir)
    adapter = os.path.join(new_run, "adapter")
    # peft without gpt-train: the base given where it is now, the adapter from its new place
    adapted = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(new_base), adapter).eval()
    x = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=x).logits, GPT2LMHeadModel.from_pretrained(new_run)(
            input_ids=x).logits, atol=1e-5, rtol=1e-5)
    resume = lora_args(char_data, new_base, new_run, "--max_iters=8", "--init_from=resume")
    with pytest.raises(UserError) as refused:
        train(load_config(resume))
    assert str(refused.value) == (f"the LoRA base (adapter/adapter_config.json's base_model_name_or_path)="
                                  f"{os.path.abspath(moved)!r}: model folder not found; if the base moved, say "
                                  "where it is now with --lora_base=PATH")  # not init_from's
    forget_the_run()
    other = str(tmp_path / "other")  # another model of the same shape
    shutil.copytree(new_base, other)
    weights = load_file(os.path.join(other, "model.safetensors"))
    weights["transformer.h.1.mlp.c_fc.weight"] *= 1.01
    save_file(weights, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"{other} is not the model the adapter in {new_run} was trained on"):
        train(load_config([*resume, f"--lora_base={other}"]))
    forget_the_run()
    run = train(load_config([*resume, f"--lora_base={new_base}"]))
    assert run.iter_num == 8
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(new_base)  # saved in its place
    AutoPeftModelForCausalLM.from_pretrained(adapter)  # and so peft finds it alone again


def test_lora_base_is_for_a_resumed_lora_run_alone(char_data, base, tmp_path):
    with pytest.raises(UserError, match="a new run adapts init_from's model: leave lora_base out"):
        train(load_config(lora_args(char_data, base, str(tmp_path / "new"), f"--lora_base={base}")))
    with pytest.raises(UserError, match=r"this run trains every weight \(finetune_method='full'\): leave it out"):
        train(load_config([f"--data_dir={char_data}", f"--out_dir={tmp_path / 'full'}", *TINY_MODEL,
                           f"--init_from={base}", f"--lora_base={base}"]))


@pytest.mark.parametrize("targets", ["c_attn,wte", "lm_head"])
def test_lora_on_the_tied_embedding_is_refused(char_data, base, tmp_path, targets):
    with pytest.raises(UserError, match="GPT-2 ties its embedding to its output layer"):
        train(load_config(lora_args(char_data, base, str(tmp_path / "out"), f"--lora_target_modules={targets}")))


@pytest.mark.parametrize("change, message", [
    ("--finetune_method=full", "trains with finetune_method='lora'; a resume cannot change it"),
    ("--lora_r=8", "trains with lora_r=4; a resume cannot change it"),
    ("--lora_dropout=0.2", "trains with lora_dropout=0.1; a resume cannot change it"),
])
def test_a_resume_cannot_change_what_the_adapters_are(char_data, base, tmp_path, change, message):
    out_dir = str(tmp_path / "lora")
    train(load_config(lora_args(char_data, base, out_dir, "--max_iters=4")))
    forget_the_run()
    with pytest.raises(UserError, match=message):
        train(load_config(lora_args(char_data, base, out_dir, "--max_iters=8", "--init_from=resume", change)))


@pytest.mark.parametrize("settings, message", [
    (["--init_from=scratch"], "finetune_method='lora' adapts a trained model: set init_from"),
    (["--optimizer=muon"], "finetune_method='lora' trains its adapters with AdamW"),
    (["--lora_r=0"], "lora_r must be at least 1, got 0"),
    (["--lora_dropout=1.0"], r"lora_dropout must be in \[0, 1\), got 1.0"),
])
def test_lora_settings_that_cannot_work_are_refused(char_data, base, tmp_path, settings, message):
    with pytest.raises(UserError, match=message):
        train(load_config(lora_args(char_data, base, str(tmp_path / "out"), *settings)))
    assert not (tmp_path / "out").exists()


def test_lora_under_fsdp_is_refused_before_anything_loads(char_data, base, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch exports for an FSDP config
    with pytest.raises(UserError, match="finetune_method='lora' does not run under FSDP"):
        train(load_config(lora_args(char_data, base, str(tmp_path / "out"))))
    assert not (tmp_path / "out").exists()


def test_unknown_target_modules_are_one_line(char_data, base, tmp_path):
    with pytest.raises(UserError, match="lora_target_modules='c_atn'"):
        train(load_config(lora_args(char_data, base, str(tmp_path / "out"), "--lora_target_modules=c_atn")))


def test_the_lora_preset_fine_tunes_a_cached_hub_model_with_activation_checkpointing_and_resumes(
        tiny_gpt2, bpe_data, tmp_path, monkeypatch, capsys):
    """init_from a Hub id (gpt2, from the HF cache: no network here): the adapter names the id, and
    a resume finds the base there again."""
    from huggingface_hub import constants
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2"
    shutil.copytree(tiny_gpt2, snapshot / "snapshots" / "0123abc")
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out_dir = str(tmp_path / "ft")
    args = [os.path.join(ROOT, "configs", "finetune_shakespeare_lora.py"), "--init_from=gpt2", f"--data_dir={bpe_data}",
            f"--out_dir={out_dir}", "--device=cpu", "--compile=False", "--block_size=32", "--batch_size=4",
            "--gradient_accumulation_steps=1", "--learning_rate=1e-2", "--eval_interval=4", "--eval_iters=2",
            "--always_save_checkpoint=True", "--gradient_checkpointing=True"]
    train(load_config([*args, "--max_iters=4"]))
    forget_the_run()
    train(load_config([*args, "--max_iters=8", "--init_from=resume"]))
    assert "resuming from iteration 4" in capsys.readouterr().out
    evals = read_metrics(out_dir, "eval")
    assert evals[-1]["iter"] == 8 and evals[-1]["val/loss"] < evals[0]["val/loss"]
    adapter = load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in adapter.items() if ".lora_B." in name]
    assert lora_b and all(tensor.abs().max() > 0 for tensor in lora_b)  # B starts at zero: gradients got through
    with open(os.path.join(out_dir, "adapter", "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == "gpt2"


@pytest.mark.slow
def test_lora_on_two_ddp_processes_matches_one_process(char_data, base, tmp_path):
    common = lora_args(char_data, base, str(tmp_path / "two"), "--gradient_accumulation_steps=2", "--max_iters=6",
                       "--lora_dropout=0.0")
    run_script(ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port(),
               "train.py", *common, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    one = str(tmp_path / "one")
    with torch_threads(1):
        train(load_config([*common, f"--out_dir={one}"]))
    for a, b in zip(read_metrics(tmp_path / "two", "train"), read_metrics(one, "train"), strict=True):
        assert abs(a["train/step_loss"] - b["train/step_loss"]) < 1e-4
    two_adapter = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for name, tensor in load_file(os.path.join(one, "adapter", "adapter_model.safetensors")).items():
        torch.testing.assert_close(two_adapter[name], tensor, atol=1e-5, rtol=1e-4)
