"""Conversations as a dataset: rendered with a chat template, tokenized with the model's own
tokenizer, written as nanoGPT's token bins plus a loss mask beside them.

    python data_prep/chat/prepare.py --source=chats.jsonl --tokenizer_from=out-shakespeare
    gpt-prepare chat --source=HuggingFaceH4/no_robots --tokenizer_from=gpt2 --messages_column=messages

Each record holds a conversation in the common `messages` format, a list of {"role", "content"}
with roles system, user and assistant. `train.mask.bin` and `val.mask.bin` (uint8, one per token)
are 1 where a token is the assistant's: the training loss counts those alone, so the model learns
to answer, not to imitate the user. The memmap sampler stays nanoGPT's (random blocks over the
concatenated conversations), each conversation ending in the tokenizer's end-of-text token.

GPT-2 has no chat template; DEFAULT_TEMPLATE ("User: ...\\nAssistant: ...<|endoftext|>") is
written with the tokenizer into the dataset folder, and a run fine-tuned on it saves it in its
model folder, so `tokenizer.apply_chat_template` and `pipeline("text-generation")` called with a
list of messages work there without gpt-train. A model's own template is used when it marks the
assistant's tokens ({% generation %}, what transformers' assistant mask needs).

Not here: the sampler that reads the mask (gpt_train.data), the loss (gpt_train.train).
"""
import functools
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from gpt_train.cli import load_config
from gpt_train.config import check_choices, setting
from gpt_train.data import MASK_DTYPE, MASK_SUFFIX, SPLITS, TOKEN_DTYPE
from gpt_train.errors import UserError, first_line

ROLES = ("system", "user", "assistant")
# The tag transformers' return_assistant_tokens_mask needs around the assistant's text: {% generation %}
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
TOO_LONG = ("truncate", "drop")
ROW_COLUMN = "__gpt_train_row"  # a record's place in its source, kept through the split
DEFAULT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- 'Assistant: ' -}}{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}{{- '\n' -}}"
    "{%- else -%}"
    "{{- message['role'] | capitalize + ': ' + message['content'] + '\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}")


@dataclass
class ChatConfig:
    source: str = setting("", "conversations: local .jsonl/.json/.parquet files (comma-separated, globs allowed) "
                              "or a Hub dataset name")
    tokenizer_from: str = setting("", "the model to fine-tune (a model folder, gpt2*, or a Hub id): its tokenizer "
                                      "encodes the conversations")
    subset: str = setting("", "the Hub dataset's configuration, if it has several")
    name: str = setting("", "dataset name, written to data/<name>; empty means the source's name")
    out_dir: str = setting("", "output folder; empty means data/<name>")
    messages_column: str = setting("messages", "column holding each conversation's list of {role, content}")
    val_fraction: float = setting(0.1, "share of the conversations held out for validation")
    seed: int = setting(2357, "seed of the conversation split")
    max_tokens: int = setting(1024, "longest conversation kept whole, in tokens (the model's context)")
    too_long: str = setting("truncate", "a longer conversation: 'truncate' (its end is cut) or 'drop'",
                            choices=TOO_LONG)
    num_proc: int = setting(1, "worker processes for loading a Hub dataset")

    def validate(self):
        check_choices(self)
        if not self.source:
            raise UserError("no source given: pass --source=FILES or --source=HUB_DATASET_NAME")
        if not self.tokenizer_from:
            raise UserError("no tokenizer given: pass --tokenizer_from=MODEL_FOLDER_OR_HUB_ID, the model you will "
                            "fine-tune")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.max_tokens < 2:
            raise UserError(f"max_tokens must be at least 2, got {self.max_tokens}")
        return self


def chat_tokenizer(tokenizer_from):
    """The model's tokenizer, with a chat template that marks the assistant's tokens."""
    from gpt_train.tokenizer import tokenizer_of

    tokenizer = tokenizer_of(tokenizer_from, "tokenizer_from")
    if tokenizer.eos_token is None:
        raise UserError(f"{tokenizer_from}'s tokenizer has no end-of-text token to end each assistant turn with "
                        "(a char vocabulary has none): fine-tune a model with GPT-2 BPE or its own BPE")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{tokenizer_from}'s tokenizer is not a fast (`tokenizers`) one: the assistant mask needs "
                        "its offsets")
    template = tokenizer.chat_template
    if template and not GENERATION_MARKER.search(template):  # "generation" alone: add_generation_prompt has it
        raise UserError(f"{tokenizer_from}'s chat template does not mark the assistant's tokens "
                        "({% generation %}...{% endgeneration %}): add the markers to it, or remove "
                        "chat_template.jinja to use gpt-train's default")
    tokenizer.chat_template = template or DEFAULT_TEMPLATE
    return tokenizer


def check_conversation(messages, where):
    """`where()`: the conversation's place, for the message (only found when one is needed)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where()} has no conversation: expected a non-empty list of {{role, content}}, got "
                        f"{type(messages).__name__}")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise UserError(f"{where()}: every message needs a 'role' and a text 'content', got {turn!r:.80}")
        if turn.get("role") not in ROLES:
            raise UserError(f"{where()}: role {turn.get('role')!r} is not one of {', '.join(ROLES)}")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise UserError(f"{where()} has no assistant message: there is nothing to learn from it")


def encode(tokenizer, messages):
    """(ids, mask): the rendered conversation's token ids and 1 for each of the assistant's."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    return np.array(rendered["input_ids"], dtype=np.int64), np.array(rendered["assistant_masks"], dtype=MASK_DTYPE)


def prepare_chat(argv):
    from gpt_train.prepare import commit_dataset  # deferred: training imports this module, not the writer
    from gpt_train.sources import load_source, progress_bars, record_place
    from gpt_train.tokenizer import save_tokenizer  # module, not them

    cfg = load_config(argv, ChatConfig)
    with progress_bars(cfg.source):
        corpus, out_dir, files = load_source(cfg, "messages_column")
    if len(corpus) < 2:
        raise UserError(f"{cfg.source} holds {len(corpus)} conversation(s): a train and a val split need at least 2")
    tokenizer = chat_tokenizer(cfg.tokenizer_from)
    # each record keeps its place in the source through the shuffled split, for the messages
    corpus = corpus.add_column(ROW_COLUMN, list(range(len(corpus))))
    parts = corpus.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed)
    place = functools.partial(record_place, cfg.source, files)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging-") as staging:
        for split, part in zip(SPLITS, (parts["train"], parts["test"]), strict=True):
            _write_split(cfg, tokenizer, part, split, staging, place)
        save_tokenizer(tokenizer, staging)
        commit_dataset(staging, out_dir)
    print(f"wrote {out_dir}")
    return out_dir


def _write_split(cfg, tokenizer, part, split, staging, place):
    """`place(row)`: where the source's row-th record is, for messages."""
    ids, masks, truncated, dropped = [], [], 0, 0
    for record, row in zip(part[cfg.messages_column], part[ROW_COLUMN], strict=True):
        check_conversation(record, lambda: place(row))
        try:
            tokens, mask = encode(tokenizer, record)
        except Exception as e:  # the template's own errors (a role it refuses, a missing variable)
            raise UserError(f"the chat template failed on the conversation at {place(row)}: {first_line(e)}") from None
        if len(tokens) > cfg.max_tokens:
            if cfg.too_long == "drop":
                dropped += 1
                continue
            tokens, mask = tokens[:cfg.max_tokens], mask[:cfg.max_tokens]
            truncated += 1
        ids.append(tokens)
        masks.append(mask)
    if not ids or not any(m.any() for m in masks):
        raise UserError(f"the {split} split holds no assistant tokens (conversations dropped as longer than "
                        f"max_tokens={cfg.max_tokens}: {dropped}): raise max_tokens or use --too_long=truncate")
    tokens, mask = np.concatenate(ids), np.concatenate(masks)
    if tokens.max() > np.iinfo(TOKEN_DTYPE).max:
        raise UserError(f"{cfg.tokenizer_from}'s vocabulary does not fit uint16 bins (id {tokens.max()})")
    tokens.astype(TOKEN_DTYPE).tofile(os.path.join(staging, f"{split}.bin"))
    mask.tofile(os.path.join(staging, split + MASK_SUFFIX))
    print(f"{split}: {len(ids):,} conversations, {len(tokens):,} tokens, {int(mask.sum()):,} of them the "
          f"assistant's ({100 * mask.mean():.1f}%); {truncated} truncated and {dropped} dropped as longer than "
          f"{cfg.max_tokens} tokens")


def copy_template(source_tokenizer, tokenizer):
    """A model fine-tuned on chat data keeps the data's template, so its folder chats without gpt-train."""
    if getattr(source_tokenizer, "chat_template", None) and not tokenizer.chat_template:
        tokenizer.chat_template = source_tokenizer.chat_template
    return tokenizer

