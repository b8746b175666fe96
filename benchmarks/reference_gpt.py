"""A plain-PyTorch GPT-2 training loop: the yardstick for the CPU recipe.

It trains the same architecture that nanoGPT's README trains on a CPU
(4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 iterations, lr 1e-3,
cosine decay to 1e-4, betas 0.9/0.99, weight decay 0.1, clip 1.0, no dropout)
with no framework around the model, and prints the median step time and the
validation loss, so a framework's overhead can be read as a ratio in one run.

    python benchmarks/reference_gpt.py --data data/shakespeare_char [--iters 2000] [--eval-iters 20]
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt_train.data import read_meta  # noqa: E402


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, block, layers, heads, d):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder with train.bin, val.bin, meta.pkl")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--eval-iters", type=int, default=20)
    a = ap.parse_args()
    torch.manual_seed(1337)
    vocab = read_meta(a.data)["vocab_size"]  # through gpt-train's plain-data unpickler: nothing runs
    block, batch, lr, min_lr, warmup = 64, 12, 1e-3, 1e-4, 100
    splits = {s: np.memmap(f"{a.data}/{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val")}

    def get_batch(split):
        data = splits[split]
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i:i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block].astype(np.int64)) for i in ix])
        return x, y

    model = GPT(vocab, block, 4, 4, 128)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    times = []
    for it in range(a.iters):
        ratio = (it + 1) / (warmup + 1) if it < warmup else 0.5 * (1 + math.cos(math.pi * (it - warmup) / (a.iters - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * ratio if it < warmup else min_lr + ratio * (lr - min_lr)
        x, y = get_batch("train")
        t0 = time.perf_counter()
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        val = sum(model(*get_batch("val")).item() for _ in range(a.eval_iters)) / a.eval_iters
    steady = sorted(times[min(50, len(times) // 2):])
    print(f"reference: median {1000 * steady[len(steady) // 2]:.2f} ms/iter, val loss {val:.4f}, "
          f"threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
