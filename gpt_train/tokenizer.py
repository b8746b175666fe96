"""Tokenizers as Hugging Face objects: GPT-2 BPE from the bundled files, and char-level.

Every model folder gpt-train writes carries its tokenizer, so `AutoTokenizer` and
`pipeline()` load it with no gpt-train installed. GPT-2 BPE comes from the `encoder.json`
and `vocab.bpe` shipped in `gpt_train/assets/gpt2` (saved as vocab.json and merges.txt), so
nothing is downloaded. A char-level vocabulary (nanoGPT's meta.pkl `stoi`) becomes a
`tokenizers` WordLevel model that splits text into single characters.

Not here: encoding whole corpora fast (data_prep uses tiktoken for that).
"""
import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast

from gpt_train.data import read_meta
from gpt_train.errors import UserError

GPT2_ASSETS = os.path.join(os.path.dirname(__file__), "assets", "gpt2")
GPT2_EOT = "<|endoftext|>"


def gpt2_tokenizer():
    return GPT2Tokenizer.from_pretrained(GPT2_ASSETS)


def char_tokenizer(stoi):
    """A fast tokenizer mapping each character of `stoi` to its id, round-tripping exactly."""
    if any(len(ch) != 1 for ch in stoi):
        raise UserError("meta.pkl's stoi must map single characters to ids")
    model = Tokenizer(models.WordLevel(vocab=dict(stoi), unk_token=None))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    model.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=model, clean_up_tokenization_spaces=False)


def dataset_tokenizer(data_dir):
    """The tokenizer a prepared dataset was encoded with.

    A folder prepared by gpt-train holds its own tokenizer files; one prepared by nanoGPT
    has a meta.pkl with a char vocabulary, or nothing, which means GPT-2 BPE.
    """
    if os.path.exists(os.path.join(data_dir, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(data_dir)
    meta = read_meta(data_dir)
    if meta and "stoi" in meta:
        return char_tokenizer(meta["stoi"])
    return gpt2_tokenizer()
