"""GPT-2 124M training speed: gpt-train's loop against a plain-PyTorch step, in one run.

The plain step is what a careful hand-written trainer does on a GPU: the same architecture
(12 layers, 12 heads, 768 wide, context 1024, vocabulary 50304 as gpt-train builds for data without a meta.pkl, no biases), bf16 autocast,
fused AdamW, flash SDPA, TF32, torch.compile, grad clipping, nanoGPT's settings (batch 12,
one micro-step). gpt-train is timed through bench.py's path (the real `fit` loop), on random
tokens written to a temporary dataset so no download is needed. Prints both ms/iter,
tokens/s and MFU, and the ratio of their tokens/s.

    python benchmarks/gpu_gpt2.py                      # on a CUDA machine
    python benchmarks/gpu_gpt2.py --small=True         # a CPU smoke run at toy size, uncompiled
"""
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_train.bench import BenchConfig, benchmark  # noqa: E402
from gpt_train.cli import load_config  # noqa: E402
from gpt_train.config import setting  # noqa: E402
from gpt_train.model import PADDED_GPT2_VOCAB  # noqa: E402
from gpt_train.progress import format_mfu, mfu, peak_flops  # noqa: E402


@dataclass
class GpuBenchConfig:
    small: bool = setting(False, "toy sizes, for a CPU smoke run")
    iters: int = setting(30, "timed iterations of each")
    warmup: int = setting(10, "untimed iterations first (compilation)")

    def validate(self):
        return self


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab, block, layers, heads, d):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def plain_ms_per_iter(shape, batch, data, device, iters, warmup, compile):
    layers, heads, d, block, vocab = shape
    model = PlainGPT(vocab, block, layers, heads, d).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), fused=True)
    step_model = torch.compile(model) if compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for it in range(warmup + iters):
        ix = np.random.randint(0, len(data) - block - 1, batch)
        rows = torch.from_numpy(np.stack([data[i:i + block + 1] for i in ix]).astype(np.int64))
        rows = rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows
        x, y = rows[:, :-1], rows[:, 1:]
        t0 = time.perf_counter()
        with autocast:
            loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if it >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv):
    cfg = load_config(argv, GpuBenchConfig)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    shape = (2, 2, 64, 64, PADDED_GPT2_VOCAB) if cfg.small else (12, 12, 768, 1024, PADDED_GPT2_VOCAB)
    batch = 2 if cfg.small else 12
    layers, heads, d, block, vocab = shape
    with tempfile.TemporaryDirectory() as data_dir:
        tokens = np.random.randint(0, min(vocab, 50257), 2_000_000 if not cfg.small else 100_000).astype(np.uint16)
        for split in ("train", "val"):
            tokens.tofile(os.path.join(data_dir, f"{split}.bin"))
        ours = benchmark(load_config([f"--data_dir={data_dir}", f"--n_layer={layers}", f"--n_head={heads}",
                                      f"--n_embd={d}", f"--block_size={block}", f"--batch_size={batch}",
                                      f"--bench_iters={cfg.iters}", f"--bench_warmup={cfg.warmup}",
                                      f"--compile={not cfg.small}"], BenchConfig))
        plain_ms = plain_ms_per_iter(shape, batch, np.memmap(os.path.join(data_dir, "train.bin"), np.uint16, "r"),
                                     device, cfg.iters, cfg.warmup, compile=not cfg.small)
    n = layers * 12 * d * d + vocab * d  # non-embedding-position parameters, tied head
    flops = (6 * n + 12 * layers * d * block) * batch * block
    print(f"plain PyTorch: {plain_ms:.2f} ms/iter, {batch * block / plain_ms * 1000:,.0f} tokens/s, "
          f"MFU {format_mfu(mfu(flops / (plain_ms / 1000), peak_flops(device)))}")
    print(f"gpt-train/plain tokens/s ratio: {plain_ms / ours['ms_per_iter']:.3f} "
          f"(1.0 or more: gpt-train is at least as fast)")


if __name__ == "__main__":
    main(sys.argv[1:])
