"""Tokenizers as Hugging Face objects: GPT-2 BPE from the bundled files, char-level, and a
byte-level BPE trained on the user's own corpus.

Every model folder gpt-train writes carries its tokenizer, so `AutoTokenizer` and
`pipeline()` load it with no gpt-train installed. GPT-2 BPE comes from the `encoder.json`
and `vocab.bpe` shipped in `gpt_train/assets/gpt2` (saved as vocab.json and merges.txt), so
nothing is downloaded. A char-level vocabulary (nanoGPT's meta.pkl `stoi`) becomes a
`tokenizers` WordLevel model that splits text into single characters.

Encoding whole corpora (data_prep) goes through the codecs at the end of this module:
tiktoken's GPT-2 encoding built from the same bundled files (never downloaded), a char codec,
and a BPE codec that `tokenizers` trains; each turns a batch of documents into one uint16-ready
numpy array.

Not here: datasets, splitting and writing bins (gpt_train.prepare).
"""
import functools
import json
import os

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast

from gpt_train.data import read_meta
from gpt_train.errors import UserError
from gpt_train.files import write_json
from gpt_train.model import GPT2_HUB_IDS, pretrained_folder
from gpt_train.out_dir import TOKENIZER_CONFIG

GPT2_ASSETS = os.path.join(os.path.dirname(__file__), "assets", "gpt2")
GPT2_EOT = "<|endoftext|>"
UNKNOWN_CHAR = "?"  # what a char vocabulary that has it reads a character it lacks as (char_tokenizer)
GPT2_EOT_ID = 50256
GPT2_VOCAB = 50257
MODEL_INPUT_NAMES = ("input_ids", "attention_mask")  # what GPT-2's forward takes from a tokenizer
# The splitting regex of tiktoken's "gpt2" encoding (tiktoken_ext.openai_public.r50k_pat_str).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# tiktoken's pinned sha256 of the files it would download for "gpt2"; the bundled copies match.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_tokenizer():
    return GPT2Tokenizer.from_pretrained(GPT2_ASSETS)


def char_tokenizer(stoi):
    """A fast tokenizer mapping each character of `stoi` to its id, round-tripping exactly.

    A character the vocabulary lacks reads as UNKNOWN_CHAR where it has one, as a codec's
    errors="replace" does: `pipeline()` and lm-eval go on where tokenizers would raise "Missing
    [UNK] token". It is the tokenizer model's fallback, not a special token that decoding skips, so
    the vocabulary and the model are unchanged; sample.py and the preparers still name such a
    character and refuse it.
    """
    if any(len(ch) != 1 for ch in stoi):
        raise UserError("meta.pkl's stoi must map single characters to ids")
    unknown = UNKNOWN_CHAR if UNKNOWN_CHAR in stoi else None
    model = Tokenizer(models.WordLevel(vocab=dict(stoi), unk_token=unknown))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    model.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=model, clean_up_tokenization_spaces=False,
                                   model_input_names=list(MODEL_INPUT_NAMES))


def save_tokenizer(tokenizer, folder, context=None):
    """`save_pretrained`, with the fields other clients need (`context`: the model's, if it has one).

    transformers 5 names a tokenizer built from a `tokenizers` object "TokenizersBackend", which
    4.x does not know (it then loads no tokenizer at all); "PreTrainedTokenizerFast" loads in
    both. The input names are written out because 4.x would otherwise also return
    token_type_ids, which GPT-2 adds to its embeddings.
    """
    if context:
        tokenizer.model_max_length = context
    tokenizer.save_pretrained(folder)
    path = os.path.join(folder, TOKENIZER_CONFIG)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_input_names"] = list(MODEL_INPUT_NAMES)
    for key in ("is_local", "local_files_only"):  # how a re-saved tokenizer was loaded, not what it is
        config.pop(key, None)
    write_json(path, config, ensure_ascii=False, sort_keys=True)


def dataset_tokenizer(data_dir):
    """The tokenizer a prepared dataset was encoded with.

    A folder prepared by gpt-train holds its own tokenizer files; one prepared by nanoGPT
    has a meta.pkl with a char vocabulary, or nothing, which means GPT-2 BPE.
    """
    if os.path.exists(os.path.join(data_dir, TOKENIZER_CONFIG)):
        return AutoTokenizer.from_pretrained(data_dir)
    meta = read_meta(data_dir)
    if meta and "stoi" in meta:
        return char_tokenizer(meta["stoi"])
    return gpt2_tokenizer()


def tokenizer_of(name, setting):
    """The tokenizer of the model `name`, as the setting `setting` named it: a model folder's, a Hub
    model's, or for GPT-2's names (gpt2 ... gpt2-xl) the bundled GPT-2 BPE, which needs no network."""
    if not os.path.isdir(name) and (name in GPT2_HUB_IDS or name in GPT2_HUB_IDS.values()):
        return gpt2_tokenizer()
    return model_tokenizer(pretrained_folder(name, setting))


def model_tokenizer(folder):
    """The tokenizer saved in a model folder, or the bundled GPT-2 BPE if it has none."""
    names = (TOKENIZER_CONFIG, "tokenizer.json", "vocab.json")
    if any(os.path.isfile(os.path.join(folder, n)) for n in names):
        return AutoTokenizer.from_pretrained(folder)
    return gpt2_tokenizer()


def is_gpt2_bpe(tokenizer):
    return len(tokenizer) == GPT2_VOCAB and tokenizer.get_vocab() == gpt2_tokenizer().get_vocab()


def token_byte_lengths(tokenizer, size):
    """How many bytes of text each id 0..size-1 stands for: 0 for special tokens (end-of-text is
    not text) and for ids past the vocabulary (a padded embedding). Byte-level BPE stores one
    character per byte; other vocabularies (characters) store the text itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a Python-only tokenizer has none
    byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    lengths = np.zeros(size, dtype=np.int64)
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))):
        if i not in special and token is not None:
            lengths[i] = len(token) if byte_level else len(token.encode("utf-8"))
    return lengths


def first_disagreement(data_tokenizer, model_tokenizer, n_ids):
    """(id, its text in the data, in the model) for the first of ids 0..n_ids-1 the two tokenizers
    read differently, or None: a model trained on data it reads differently learns scrambled text."""
    if data_tokenizer.get_vocab() == model_tokenizer.get_vocab():
        return None
    for i in range(n_ids):
        theirs, ours = data_tokenizer.decode([i]), model_tokenizer.decode([i])
        if theirs != ours:
            return i, theirs, ours
    return None


@functools.cache
def gpt2_encoding():
    """tiktoken's GPT-2 BPE, built from the bundled files: identical ids, no download.

    The name differs from tiktoken's registered "gpt2" on purpose: a registered encoding is
    pickled by name and rebuilt from the network in worker processes.
    """
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(GPT2_ASSETS, "merges.txt"),
        encoder_json_file=os.path.join(GPT2_ASSETS, "vocab.json"),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding("gpt2-bundled", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={GPT2_EOT: GPT2_EOT_ID}, explicit_n_vocab=GPT2_VOCAB)


class Gpt2Codec:
    """GPT-2 BPE for corpora: ordinary text only (a literal "<|endoftext|>" is just text)."""

    vocab_size = GPT2_VOCAB
    eot = GPT2_EOT_ID

    def __init__(self):
        gpt2_encoding()  # built once here; forked workers inherit it instead of rebuilding it

    def encode_batch(self, texts, append_eot):
        encoding = gpt2_encoding()  # cached per process, so pickling this codec stays cheap
        eot = np.array([self.eot], dtype=np.uint32)
        parts = []
        for text in texts:
            # encode_ordinary as numpy: no Python int per token. No special tokens allowed and
            # none disallowed means a literal "<|endoftext|>" in the text is encoded as text.
            parts.append(encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=()))
            if append_eot:
                parts.append(eot)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)

    def tokenizer(self):
        return gpt2_tokenizer()


class CharCodec:
    """One token per character; ids are ranks in the sorted character set, as nanoGPT's stoi."""

    eot = None  # a char vocabulary has no end-of-text token: documents are simply concatenated

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self.codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self.vocab_size = len(self.chars)

    def encode_batch(self, texts, append_eot):
        codepoints = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        return np.searchsorted(self.codepoints, codepoints).astype(np.uint32)

    @property
    def stoi(self):
        return {ch: i for i, ch in enumerate(self.chars)}

    def tokenizer(self):
        return char_tokenizer(self.stoi)

    def nanogpt_meta(self):  # only char data have one: nanoGPT reads a folder without it as GPT-2 BPE
        return {"vocab_size": self.vocab_size, "itos": dict(enumerate(self.chars)), "stoi": self.stoi}


class BpeCodec:
    """A byte-level BPE trained on the corpus with `tokenizers`: GPT-2's pre-tokenisation (its
    regex, then bytes), so any text encodes, and an end-of-text token after the merges.

    Workers encode with the merges alone, so a literal "<|endoftext|>" in the text stays text,
    as with GPT-2 BPE; the saved tokenizer adds the token as GPT-2's bos/eos.
    """

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size  # asked for; after `train`, what the corpus gave (a small one gives fewer)
        self.json = None  # the trained merges: what worker processes receive
        self.eot = None  # the id after the merges, once trained

    def train(self, batches, length=None):
        """Learn the merges from an iterator of lists of texts (deterministic: the same texts give
        the same merges; `tokenizers` counts in parallel on every core)."""
        model = Tokenizer(models.BPE())
        model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        model.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=self.vocab_size - 1, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        model.train_from_iterator(batches, trainer, length=length)
        self.json = model.to_str()
        self.eot = model.get_vocab_size()
        self.vocab_size = self.eot + 1
        return self

    def encode_batch(self, texts, append_eot):
        parts = []
        for encoding in _bpe_model(self.json).encode_batch_fast(texts, add_special_tokens=False):
            parts.append(np.array(encoding.ids, dtype=np.uint32))
            if append_eot:
                parts.append(np.array([self.eot], dtype=np.uint32))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)

    def tokenizer(self):
        model = Tokenizer.from_str(self.json)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, clean_up_tokenization_spaces=False,
                                            model_input_names=list(MODEL_INPUT_NAMES))
        tokenizer.add_special_tokens({"eos_token": GPT2_EOT, "bos_token": GPT2_EOT, "unk_token": GPT2_EOT})
        return tokenizer


@functools.lru_cache(maxsize=1)
def _bpe_model(json_text):
    return Tokenizer.from_str(json_text)  # once per worker process, not per batch


class ModelCodec:
    """A model's own tokenizer for corpora (`--tokenizer_from`): its ids, its end-of-text token if it
    has one (a char vocabulary has none: documents are simply concatenated)."""

    def __init__(self, tokenizer):
        self.hf_tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eot = tokenizer.eos_token_id
        self.vocab = set(tokenizer.get_vocab())
        self.chars = all(len(token) == 1 for token in self.vocab) and tokenizer.eos_token_id is None

    def check_covers(self, part, column, name):
        """Every character of the texts must be in a char vocabulary: the first one missing, as a UserError."""
        if not self.chars:
            return  # byte-level BPE encodes any text
        for row, text in enumerate(part[column]):
            for offset, ch in enumerate(text):
                if ch not in self.vocab:
                    line = text.count("\n", 0, offset) + 1
                    raise UserError(f"{name}'s char vocabulary has no {ch!r} (document {row}, line {line}): "
                                    "remove or replace that character, or prepare the data for a model with a BPE "
                                    "vocabulary")

    def encode_batch(self, texts, append_eot):
        parts = []
        for ids in self.hf_tokenizer(texts, add_special_tokens=False)["input_ids"]:
            parts.append(np.array(ids, dtype=np.uint32))
            if append_eot and self.eot is not None:
                parts.append(np.array([self.eot], dtype=np.uint32))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)

    def tokenizer(self):
        return self.hf_tokenizer
