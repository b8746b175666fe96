"""Sampling speed: sample.py (pipeline, KV cache, sliding context) against nanoGPT's generate loop.

Builds the shakespeare_char model's shape (6 layers, 6 heads, 384 wide, context 256, the
65-character vocabulary) with random weights, saves it as a model folder and draws the same
work both ways in one run: `num_samples` samples of `max_new_tokens` from "\\n" at nanoGPT's
settings (temperature 0.8, top_k 200). sample.py's path is the real one (`gpt_train.sample`
loading the folder, through the pipeline); the naive path is nanoGPT's `generate` on the same
model: a full forward over the cropped context for every token, no cache. Prints tokens/s
for each and the ratio.

    python benchmarks/sample_speed.py [--num_samples=10] [--max_new_tokens=500] [--device=cpu]
"""
import argparse
import io
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt_train.cli import load_config  # noqa: E402
from gpt_train.model import build_model  # noqa: E402
from gpt_train.sample import SampleConfig, sample  # noqa: E402
from gpt_train.tokenizer import char_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "data_prep", "tinyshakespeare", "input.txt")
MODEL_SHAPE = ["configs/train_shakespeare_char.py", "--dropout=0.0"]  # 6 x 384, 6 heads, context 256


def build_folder(folder):
    with open(SHAKESPEARE, encoding="utf-8") as f:
        chars = sorted(set(f.read()))
    tokenizer = char_tokenizer({ch: i for i, ch in enumerate(chars)})
    torch.manual_seed(0)
    model = build_model(load_config([os.path.join(ROOT, p) if p.endswith(".py") else p for p in MODEL_SHAPE]),
                        len(chars), tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def nanogpt_generate(model, idx, max_new_tokens, temperature, top_k):
    """nanoGPT model.py's generate, on the HF model: the whole cropped context every token."""
    block_size = model.config.n_positions
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
        logits = model(idx_cond, use_cache=False).logits
        logits = logits[:, -1, :] / temperature
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("Inf")
        probs = torch.nn.functional.softmax(logits, dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
    return idx


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=10)
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    total = args.num_samples * args.max_new_tokens
    with tempfile.TemporaryDirectory() as folder:
        build_folder(folder)
        cfg = load_config([f"--init_from={folder}", f"--num_samples={args.num_samples}",
                           f"--max_new_tokens={args.max_new_tokens}", f"--device={args.device}",
                           "--stream=False", "--dtype=float32"], SampleConfig)
        t0 = time.perf_counter()
        texts = sample(cfg, io.StringIO())
        ours = time.perf_counter() - t0  # model loading included: the cost a sample.py user pays
        assert all(len(t) == 1 + args.max_new_tokens for t in texts)  # "\n" + every new char

        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(folder).to(args.device).eval()
        torch.manual_seed(cfg.seed)
        start = torch.zeros((1, 1), dtype=torch.long, device=args.device)  # "\n" is id 0
        t0 = time.perf_counter()
        for _ in range(args.num_samples):
            out = nanogpt_generate(model, start, args.max_new_tokens, cfg.temperature, cfg.top_k)
            assert out.shape[1] == 1 + args.max_new_tokens
        naive = time.perf_counter() - t0
    print(f"{args.num_samples} samples x {args.max_new_tokens} new tokens, context 256, on {args.device} "
          f"({torch.get_num_threads()} threads)")
    print(f"sample.py (pipeline, KV cache, sliding context): {total / ours:,.0f} tokens/s ({ours:.1f} s)")
    print(f"naive (nanoGPT generate, no cache):               {total / naive:,.0f} tokens/s ({naive:.1f} s)")
    print(f"speed-up: {naive / ours:.1f}x")


if __name__ == "__main__":
    main()
