"""nanoGPT interop: its ckpt.pt to a model folder with the same logits, and back.

The reference below is nanoGPT's GPT architecture written out small for this test (module
names, nn.Linear layouts, optional biases, exact GELU, tied embeddings), so the checkpoint
has exactly nanoGPT's layout without nanoGPT installed.
"""
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoTokenizer, GPT2LMHeadModel

from conftest import run_script
from gpt_train.convert import from_nanogpt, load_nanogpt_checkpoint, main, to_nanogpt
from gpt_train.data import read_meta
from gpt_train.errors import UserError

TOLERANCE = 1e-5


class LayerNorm(nn.Module):
    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Block(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = LayerNorm(n_embd, bias), LayerNorm(n_embd, bias)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.attn.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.mlp.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn.c_proj(y)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout=0.0):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer)), ln_f=LayerNorm(n_embd, bias)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for p in self.parameters():  # random everywhere, biases and LayerNorms included: nothing matches by luck
            nn.init.normal_(p, std=0.3)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def model_args(bias, vocab_size=65):
    return dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=bias, vocab_size=vocab_size, dropout=0.0)


def save_nanogpt_ckpt(path, model, args, compiled=False, dataset="shakespeare_char", **extra):
    """Saved as nanoGPT's train.py saves: raw state dict (compiled: `_orig_mod.` names), model_args, ..."""
    state = model.state_dict()
    if compiled:
        state = {"_orig_mod." + k: v for k, v in state.items()}
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = {"model": state, "optimizer": optimizer.state_dict(), "model_args": args, "iter_num": 250,
            "best_val_loss": torch.tensor(1.4697), "config": {"dataset": dataset, "learning_rate": 1e-3,
                                                                "compile": compiled}, **extra}
    torch.save(ckpt, path)
    return str(path)


def char_meta_dir(tmp_path, vocab_size=65):
    folder = tmp_path / "data" / "shakespeare_char"
    folder.mkdir(parents=True)
    chars = [chr(c) for c in range(32, 32 + vocab_size - 1)] + ["\n"]
    stoi = {ch: i for i, ch in enumerate(chars)}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab_size, "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return str(folder)


def hf_logits(folder, idx):
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=idx).logits


@pytest.mark.parametrize("bias, compiled", [(False, True), (True, False)])
def test_nanogpt_checkpoint_converts_with_matching_logits_and_back(tmp_path, bias, compiled):
    torch.manual_seed(0)
    args = model_args(bias)
    reference = NanoGPT(**args).eval()
    ckpt = save_nanogpt_ckpt(tmp_path / "ckpt.pt", reference, args, compiled=compiled)
    folder = str(tmp_path / "hf")
    from_nanogpt(ckpt, folder, meta=char_meta_dir(tmp_path))

    idx = torch.randint(args["vocab_size"], (3, args["block_size"]))
    with torch.no_grad():
        expected = reference(idx)
    assert (hf_logits(folder, idx) - expected).abs().max() < TOLERANCE
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer("HI, YOU!\n")["input_ids"]) == "HI, YOU!\n"
    assert tokenizer("!")["input_ids"] == [1]  # the meta.pkl's ids, not GPT-2's

    back = str(tmp_path / "nanogpt" / "ckpt.pt")
    to_nanogpt(folder, back)
    saved = load_nanogpt_checkpoint(back)
    assert saved["model_args"] == args
    again = NanoGPT(**saved["model_args"]).eval()
    again.load_state_dict(saved["model"], strict=True)  # nanoGPT's names and shapes exactly
    with torch.no_grad():
        assert (again(idx) - expected).abs().max() < TOLERANCE
    meta = read_meta(os.path.dirname(back))  # plain data: our safe unpickler reads it
    assert meta["stoi"]["!"] == 1 and meta["itos"][1] == "!" and meta["vocab_size"] == 65


@pytest.mark.slow
def test_bpe_checkpoint_converts_on_the_command_line_with_gpt2_tokenizer(tmp_path):
    torch.manual_seed(1)
    args = model_args(bias=False, vocab_size=50304)
    ckpt = save_nanogpt_ckpt(tmp_path / "ckpt.pt", NanoGPT(**args), args, dataset="openwebtext")
    folder = str(tmp_path / "hf")
    result = run_script("-m", "gpt_train.convert", "from-nanogpt", ckpt, folder)
    assert "wrote" in result.stdout and "iter 250" in result.stdout
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    model = GPT2LMHeadModel.from_pretrained(folder)
    assert model.config.activation_function == "gelu" and model.config.bias is False
    assert model.config.eos_token_id == 50256


def test_numpy_scalars_in_the_checkpoint_load_but_arbitrary_objects_do_not(tmp_path):
    args = model_args(bias=True)
    ok = save_nanogpt_ckpt(tmp_path / "np.pt", NanoGPT(**args), args, best_val_loss=np.float64(1.5),
                           extra_count=np.int64(3))
    assert load_nanogpt_checkpoint(ok)["best_val_loss"] == 1.5
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "model_args": args, "config": {"x": Pickled()}}, bad)
    with pytest.raises(UserError, match="refusing to unpickle it"):
        load_nanogpt_checkpoint(str(bad))
    assert not os.path.exists(tmp_path / "pwned")


class Pickled:
    def __reduce__(self):
        return (os.mkdir, ("pwned",))


def test_char_model_without_meta_is_a_clear_one_line_error(tmp_path, capsys):
    args = model_args(bias=True)
    ckpt = save_nanogpt_ckpt(tmp_path / "ckpt.pt", NanoGPT(**args), args, dataset="not_here")
    with pytest.raises(SystemExit) as stop:
        main(["from-nanogpt", ckpt, str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "65-token vocabulary" in err and "--meta=data/<dataset>" in err


def test_checkpoint_with_mismatched_bias_setting_is_refused(tmp_path):
    args = model_args(bias=False)
    ckpt = save_nanogpt_ckpt(tmp_path / "ckpt.pt", NanoGPT(**args), {**args, "bias": True})
    with pytest.raises(UserError, match="ln_1.bias is missing .model_args says bias=True"):
        from_nanogpt(ckpt, str(tmp_path / "hf"), meta=char_meta_dir(tmp_path))
