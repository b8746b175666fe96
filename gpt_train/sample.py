"""Sampling: `python sample.py [preset.py ...] [--key=value ...]`, nanoGPT's sample.py on transformers.

The model is any folder `from_pretrained` loads (out_dir by default, `init_from='resume'`),
a GPT-2 name (`gpt2` ... `gpt2-xl`, fetched as openai-community/*) or another Hub id. Text
goes through a transformers `pipeline("text-generation")` whose forward step is
`generate_sliding`: plain cached `generate` while the text fits the model's context, and past
it nanoGPT's sliding context, so max_new_tokens is not bounded by the context.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --init_from=gpt2-xl --start=FILE:prompt.txt --max_new_tokens=100
    python sample.py --out_dir=out-chat --chat          # one user turn per line on stdin

Not here: training (gpt_train.train), the generation defaults saved with a model (gpt_train.model).
"""
import os
import sys
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextGenerationPipeline, TextStreamer, pipeline
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from gpt_train.cli import load_config
from gpt_train.config import DTYPES, check_choices, setting
from gpt_train.device import resolve_device, torch_dtype
from gpt_train.errors import UserError, exit_on_user_error, first_line
from gpt_train.model import GPT2_HUB_IDS, pretrained_folder
from gpt_train.out_dir import check_model_files, check_model_folder
from gpt_train.store import is_url, model_folder

SEPARATOR = "---------------"  # between samples, as nanoGPT prints them
FILE_PREFIX = "FILE:"
# When the text fills the context, the oldest quarter is dropped and the rest re-read in one
# cached forward: each new token then sees between 3/4 and all of the context (nanoGPT: all of
# it, at the price of a full forward per token; see generate_sliding).
SLIDE_FRACTION = 4


@dataclass
class SampleConfig:
    init_from: str = setting("resume", "'resume' (the model in out_dir), 'gpt2*', a Hub id or a model folder")
    out_dir: str = setting("out", "the trained model folder, used when init_from='resume'")
    start: str = setting("\n", "the prompt, or FILE:path to read it from a file")
    num_samples: int = setting(10, "samples to draw")
    max_new_tokens: int = setting(500, "tokens generated per sample; may exceed the model's context")
    temperature: float = setting(0.8, "1.0 = the model's distribution, lower = less random; 0 = greedy")
    top_k: int = setting(200, "sample from the k most likely tokens only; 0 = all")
    top_p: float = setting(1.0, "sample from the smallest set of tokens with this much probability; 1.0 = all")
    seed: int = setting(1337, "seed for sampling: the same seed gives the same samples")
    device: str = setting("auto", "'auto' picks cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps")
    dtype: str = setting("auto", "'auto' is bfloat16 on GPUs that support it, float16 on other GPUs, float32 on CPU",
                         choices=DTYPES)
    compile: bool = setting(False, "torch.compile the model's forward")
    stream: bool = setting(True, "print tokens as they are generated")
    chat: bool = setting(False, "talk to the model: each line read from stdin is a user turn, answered with the "
                                "model's chat template, the conversation kept in the context")

    def validate(self):
        check_choices(self)
        for name in ("num_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise UserError(f"temperature must not be negative, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must not be negative (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.init_from:
            raise UserError("init_from must not be empty: 'resume', a gpt2 name, a Hub id or a folder")
        return self


# ---------------------------------------------------------------------------------------------
# Generation past the context


class _ChunkStreamer(BaseStreamer):
    """Forwards one chunk's new tokens to the user's streamer; drops its prompt echo and its end."""

    def __init__(self, streamer):
        self.streamer, self.prompt_seen = streamer, False

    def put(self, value):
        if self.prompt_seen:
            self.streamer.put(value)
        self.prompt_seen = True  # generate's first put is the (re-read) context

    def end(self):
        pass  # the whole generation ends once, after the last chunk


@torch.no_grad()
def generate_sliding(model, input_ids, max_new_tokens, attention_mask=None, streamer=None, **generate_kwargs):
    """`model.generate` for any number of new tokens, the context sliding as in nanoGPT.

    While prompt and new tokens fit in the context this is one plain `generate` call with its
    KV cache. When they fill it, the oldest 1/SLIDE_FRACTION of the context is dropped and
    generation continues on the rest (one cached prefill), and so on. nanoGPT conditions every
    token on exactly the last block_size tokens, which GPT-2's absolute positions make a full
    forward per token; this keeps between 3/4 and all of them at a fraction of the cost.
    Returns prompt + new tokens, like `generate`; stops early only where `generate` does (an
    end-of-text token), never for a model without one.
    """
    generate_kwargs["max_length"] = None  # max_new_tokens decides: the folder's max_length would only warn
    window = getattr(model.config, "max_position_embeddings", None)  # GPT-2's n_positions; None: unbounded
    if window is None or input_ids.shape[1] + max_new_tokens <= window:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                              max_new_tokens=max_new_tokens, **generate_kwargs)
    keep = window - max(1, window // SLIDE_FRACTION)
    eos = generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=input_ids.device)
    pad = generate_kwargs.get("pad_token_id", model.generation_config.pad_token_id)
    ids = input_ids
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    if streamer is not None:
        streamer.put(input_ids.cpu())  # the prompt, once, as plain generate would
    remaining = max_new_tokens
    while remaining > 0:
        context_size = ids.shape[1] if ids.shape[1] < window else keep
        context, context_mask = ids[:, -context_size:], mask[:, -context_size:]
        n = min(remaining, window - context_size)
        out = model.generate(input_ids=context, attention_mask=context_mask, max_new_tokens=n,
                             streamer=None if streamer is None else _ChunkStreamer(streamer),
                             **generate_kwargs)
        if out.shape[0] != ids.shape[0]:  # num_return_sequences expanded the batch on the first chunk
            copies = out.shape[0] // ids.shape[0]
            ids, mask, finished = (t.repeat_interleave(copies, dim=0) for t in (ids, mask, finished))
            generate_kwargs["num_return_sequences"] = 1
        new = out[:, context_size:]
        if pad is not None:
            new[finished] = pad  # a row that ended in an earlier chunk stays ended
        finished |= torch.isin(new, eos).any(dim=1)
        ids = torch.cat([ids, new], dim=1)
        mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        remaining -= n
        if new.shape[1] < n or finished.all():
            break  # generate stopped: every row reached its end-of-text
    if streamer is not None:
        streamer.end()
    return ids


class SlidingTextGenerationPipeline(TextGenerationPipeline):
    """transformers' text-generation pipeline with `generate_sliding` as its forward step."""

    def _forward(self, model_inputs, **generate_kwargs):
        input_ids = model_inputs["input_ids"]
        if input_ids.shape[1] == 0:
            raise UserError("the prompt encodes to no tokens: give a non-empty --start")
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        max_new_tokens = generate_kwargs.pop("max_new_tokens", None)
        if max_new_tokens is None:  # a length set some other way (max_length): plain generate
            return super()._forward(model_inputs, **generate_kwargs)
        out = generate_sliding(self.model, input_ids, max_new_tokens,
                               attention_mask=model_inputs.get("attention_mask"), **generate_kwargs)
        return {"generated_sequence": out.reshape(input_ids.shape[0], -1, out.shape[1]),
                "input_ids": input_ids, "prompt_text": model_inputs["prompt_text"]}


# ---------------------------------------------------------------------------------------------
# The sample.py entry point


def model_source(cfg):
    """What to load: out_dir for 'resume', openai-community/* for GPT-2 names, else init_from."""
    if cfg.init_from == "resume" and is_url(cfg.out_dir):
        return model_folder(cfg.out_dir, "out_dir")
    if is_url(cfg.init_from):
        return model_folder(cfg.init_from, "init_from")
    if cfg.init_from == "resume":
        check_model_folder(cfg.out_dir, ": train a model first (python train.py ...) or point --out_dir at a "
                                        "folder written by train.py or save_pretrained")
        check_model_files(cfg.out_dir)
        return cfg.out_dir
    if os.path.isdir(cfg.init_from):
        check_model_files(cfg.init_from)
        return cfg.init_from
    return GPT2_HUB_IDS.get(cfg.init_from, cfg.init_from)


def read_prompt(start):
    if not start.startswith(FILE_PREFIX):
        return start
    path = start[len(FILE_PREFIX):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read the prompt file {path} given as start=FILE:{path}: {e.strerror}") from None


def load_generator(cfg):
    """The text-generation pipeline for cfg's model on cfg's device, in cfg's precision."""
    source = model_source(cfg)
    device = resolve_device(cfg.device)
    dtype = torch_dtype(cfg.dtype, device)
    if not os.path.exists(source) and not source.startswith((".", "/", "~")):
        source = pretrained_folder(source)  # a Hub id: the cached snapshot, or a fast, clear offline failure
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model from {source!r} ({first_line(e)}): give a model "
                        "folder, a gpt2 name or a Hub id reachable from here") from None
    if cfg.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    return pipeline("text-generation", model=model, tokenizer=tokenizer, device=device,
                    pipeline_class=SlidingTextGenerationPipeline)


def check_encodable(tokenizer, prompt):
    """The prompt must encode as written: a char vocabulary would read a character it lacks as '?'
    (or, in folders saved before that, fail), so say which characters it lacks."""
    vocab = tokenizer.get_vocab()
    missing = sorted(set(prompt) - set(vocab)) if all(len(token) == 1 for token in vocab) else []
    if missing:
        raise UserError(f"the model's vocabulary has no {', '.join(map(repr, missing[:10]))}: "
                        "remove them from the prompt")
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise UserError("the prompt is empty: give --start=TEXT or --start=FILE:path")


def generation_kwargs(cfg):
    """nanoGPT's sampling settings in generate's names; temperature 0 means greedy."""
    if cfg.temperature == 0:
        return {"max_new_tokens": cfg.max_new_tokens, "do_sample": False}
    return {"max_new_tokens": cfg.max_new_tokens, "do_sample": True, "temperature": cfg.temperature,
            "top_k": cfg.top_k, "top_p": cfg.top_p}


def sample(cfg, out=None):
    """Draw cfg.num_samples samples and print each (to `out`, else sys.stdout as it is when called),
    streamed or whole; returns their texts."""
    out = out or sys.stdout
    hf_logging.disable_progress_bar()  # a weight-loading bar is noise around the samples
    generator = load_generator(cfg)
    prompt = read_prompt(cfg.start)
    check_encodable(generator.tokenizer, prompt)
    torch.manual_seed(cfg.seed)  # once, as nanoGPT: samples differ, runs repeat
    texts = []
    for _ in range(cfg.num_samples):
        kwargs = generation_kwargs(cfg)
        if cfg.stream:
            out.write(prompt)
            out.flush()
            kwargs["streamer"] = _TerminalStreamer(generator.tokenizer, out)
        text = generator(prompt, **kwargs)[0]["generated_text"]
        if not cfg.stream:
            out.write(text)
        out.write("\n" + SEPARATOR + "\n")
        out.flush()
        texts.append(text)
    return texts


def chat(cfg, lines=None, out=None):
    """A conversation: each line of `lines` (stdin) a user turn, each answer printed and kept in the
    context, the oldest turns dropped when it is full. Returns the messages."""
    out, lines = out or sys.stdout, lines if lines is not None else sys.stdin
    hf_logging.disable_progress_bar()
    generator = load_generator(cfg)
    tokenizer, model = generator.tokenizer, generator.model
    if not tokenizer.chat_template:
        raise UserError(f"{model_source(cfg)} has no chat template: fine-tune it on a chat dataset first "
                        "(data_prep/chat/prepare.py), or sample it without --chat")
    context = model.config.max_position_embeddings
    budget = min(cfg.max_new_tokens, context // 2)  # room left for each answer
    torch.manual_seed(cfg.seed)
    messages = []
    for line in lines:
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        while True:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            if ids.shape[1] + budget <= context or len(messages) == 1:
                break
            messages = messages[2:] if messages[0]["role"] != "system" else messages[:1] + messages[3:]
        if ids.shape[1] + budget > context:  # said, and the conversation goes on without it
            messages.pop()
            out.write(f"(that turn is {ids.shape[1]} tokens, too long for the model's {context}-token context with "
                      f"room for an answer of {budget}: write a shorter one)\n")
            continue
        ids = ids.to(model.device)
        kwargs = {**generation_kwargs(cfg), "max_new_tokens": budget, "max_length": None}  # the folder's would warn
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:]
        answer = tokenizer.decode(new, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        out.write(f"assistant: {answer}\n")
        out.flush()
    return messages


class _TerminalStreamer(TextStreamer):
    """TextStreamer that writes to `out` (a file or the terminal) and skips the prompt."""

    def __init__(self, tokenizer, out):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text, stream_end=False):
        self.out.write(text)
        self.out.flush()


@exit_on_user_error
def main(argv=None):
    cfg = load_config(sys.argv[1:] if argv is None else argv, SampleConfig)
    chat(cfg) if cfg.chat else sample(cfg)


if __name__ == "__main__":
    main()
