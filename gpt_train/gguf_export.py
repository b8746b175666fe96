"""A model folder as one GGUF file, the format llama.cpp (and so Ollama and LM Studio) runs:
`python -m gpt_train.convert to-gguf OUT_DIR [GGUF_FILE] [--outtype=f16]`.

Written with `gguf`, the format's own library, as llama.cpp's convert_hf_to_gguf.py writes a
GPT2LMHeadModel: architecture "gpt2", its tensor names, Conv1D weights transposed to the
nn.Linear layout llama.cpp multiplies by, 1-D tensors and the position table in f32. That
converter knows a byte-level BPE's pre-tokenizer only by a hash of known vocabularies, so it
refuses a BPE trained by gpt-train ("BPE pre-tokenizer was not recognized") and has no char
vocabulary type at all. Here every vocabulary is written as llama.cpp's "gpt2" BPE with GPT-2's
pre-tokenizer named ("gpt-2"):

- GPT-2's and gpt-train's own BPE are that already (GPT-2's regex, then bytes): their tokens
  and merges go in as the tokenizer holds them.
- A char vocabulary becomes a BPE whose tokens are its characters spelled in GPT-2's byte
  alphabet, with merges that only join the bytes of one character: llama.cpp's tokenizer then
  gives every character its id, as the folder's tokenizer does. It has no end-of-text token,
  and llama.cpp takes one anyway (id 11 unless told): the newline is named, so generation stops
  at the end of a line unless the client ignores it (llama.cpp's --ignore-eos).

Ids past the tokenizer (a vocabulary padded to a multiple of 64) are "[PADn]", unused, as
llama.cpp's converter writes them. Not here: quantizing below 8 bits (llama.cpp's
llama-quantize does that from an f16 or f32 file).
"""
import json
import os

import gguf
import numpy as np
import torch
from tokenizers import pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from gpt_train.errors import UserError
from gpt_train.files import atomic_path
from gpt_train.out_dir import (MODEL_CONFIG, check_model_files, check_model_folder, has_checkpoint, is_model_folder,
                               written_by_gpt_train)
from gpt_train.tokenizer import model_tokenizer

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2]  # "gpt2"
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's splitting regex
# --outtype: what the 2-D weights are stored as; llama.cpp keeps 1-D tensors and positions in f32
OUTTYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
            "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
            "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
            "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
ALWAYS_F32 = (gguf.MODEL_TENSOR.POS_EMBD,)  # as llama.cpp's converter: never quantized
# GPT-2's GELU as llama.cpp computes it (tanh); exact GELU ("gelu") is within ~1e-3 of it
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
EXACT_GELU = "gelu"
NEVER_MERGED = "ÿ ÿ"  # two 0xFF bytes in GPT-2's byte alphabet


def to_gguf(out_dir, path=None, outtype="f16", force=False):
    """Write out_dir's model as a GGUF file at `path` (default: OUT_DIR-OUTTYPE.gguf beside the
    folder; a folder: that name inside it); returns (the path, notes worth printing). An existing
    file is replaced only with `force`, and never one a run folder holds as its own."""
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype={outtype}: choose one of {', '.join(OUTTYPES)}")
    check_model_folder(out_dir)
    check_model_files(out_dir)
    config, notes = _check_architecture(out_dir)
    default_name = f"{os.path.basename(os.path.abspath(out_dir))}-{outtype}.gguf"
    if path is None:
        path = os.path.join(os.path.dirname(os.path.abspath(out_dir)), default_name)
    elif os.path.isdir(path):
        path = os.path.join(path, default_name)
    check_destination(path, force)
    tokenizer = model_tokenizer(out_dir)
    vocab = gguf_vocabulary(tokenizer, config.vocab_size)
    notes += vocab.pop("notes")
    hf_logging.disable_progress_bar()  # a bar for loading a folder would outlast the command's own lines
    try:
        model = GPT2LMHeadModel.from_pretrained(out_dir, dtype=torch.float32)
    finally:
        hf_logging.enable_progress_bar()
    qtype, file_type = OUTTYPES[outtype]
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(os.path.basename(os.path.abspath(out_dir)))
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocabulary(writer, vocab)
        if getattr(tokenizer, "chat_template", None):  # a chat fine-tune: llama.cpp's chat reads it from here
            writer.add_chat_template(tokenizer.chat_template)
        fell_back = _add_tensors(writer, model, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if fell_back:
        notes.append(f"{len(fell_back)} weights (e.g. {fell_back[0]}) have rows that are no multiple of "
                     f"{gguf.GGML_QUANT_SIZES[qtype][0]}: stored as f16, as llama.cpp's converter does")
    notes.append(f"the model knows {config.n_positions} positions (learned, not extended): run llama.cpp with "
                 f"-c {config.n_positions} and a prompt plus -n of at most {config.n_positions} tokens; past them "
                 "it aborts (GGML_ASSERT)")
    return path, notes


def check_destination(path, force):
    """Where the GGUF file may go: into an existing folder, over no file unless `force`, and never
    over a file of a run or model folder that gpt-train writes (its weights, config, state)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: the folder {folder} does not exist; create it first or give another GGUF_FILE")
    owner = _run_folder_owning(os.path.abspath(path))
    if owner:
        raise UserError(f"{path} is one of the files of the model folder {owner}: write the GGUF file elsewhere, "
                        "e.g. leave GGUF_FILE out for OUT_DIR-OUTTYPE.gguf beside the folder")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UserError(f"{path} exists and is not a file: give another GGUF_FILE")
    if os.path.exists(path) and not force:
        raise UserError(f"{path} exists: replace it with --force, or give another GGUF_FILE")


def _run_folder_owning(path):
    """The model or run folder of which `path` is, or is inside, one of the entries gpt-train
    writes (model.safetensors, training_state/...), or None."""
    child, parent = path, os.path.dirname(path)
    while parent != child:
        if written_by_gpt_train(os.path.basename(child)) and (is_model_folder(parent) or has_checkpoint(parent)):
            return parent
        child, parent = parent, os.path.dirname(parent)
    return None


def _check_architecture(out_dir):
    """Its GPT2Config and notes for what llama.cpp computes nearly, or a one-line refusal of what
    llama.cpp's "gpt2" cannot compute."""
    with open(os.path.join(out_dir, MODEL_CONFIG), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")  # readable: check_model_files has parsed it
    if model_type != "gpt2":
        raise UserError(f"{out_dir} holds a {model_type!r} model, not GPT-2: convert it with llama.cpp's "
                        "convert_hf_to_gguf.py, which knows many architectures")
    config = GPT2Config.from_pretrained(out_dir)
    notes = []
    if config.activation_function == EXACT_GELU:
        notes.append("the model computes exact GELU and llama.cpp GPT-2's tanh approximation: its logits differ "
                     "slightly (about 1e-3), as for nanoGPT models in transformers")
    elif config.activation_function not in TANH_GELU:
        raise UserError(f"{out_dir} uses activation_function={config.activation_function!r}, and llama.cpp's GPT-2 "
                        "computes GELU only")
    if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
        raise UserError(f"{out_dir} scales its attention differently from GPT-2 (scale_attn_weights, "
                        "scale_attn_by_inverse_layer_idx), which llama.cpp's GPT-2 cannot do")
    return config, notes


def gguf_vocabulary(tokenizer, vocab_size):
    """{"tokens", "types", "merges", "bos", "eos", "notes"}: the tokenizer as llama.cpp's "gpt2" BPE
    over the model's `vocab_size` ids."""
    saved = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = saved["model"], saved.get("pre_tokenizer") or {}
    notes = []
    if model["type"] == "BPE" and _gpt2_byte_level(saved):
        pieces = dict(model["vocab"])  # already in GPT-2's byte alphabet
        merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    elif model["type"] == "WordLevel" and all(len(t) == 1 for t in model["vocab"]):
        pieces = {byte_level(ch): i for ch, i in model["vocab"].items()}
        merges = _character_merges(sorted(pieces, key=pieces.get))
        newline = model["vocab"].get("\n", 0)
        bos = eos = newline
        notes.append(f"a char vocabulary has no end-of-text token, and llama.cpp needs one: it is the newline "
                     f"(id {newline}), so generation stops at a line's end unless told to ignore it (--ignore-eos)")
    else:
        kind = f"{model['type']} with a {pre.get('type', 'missing')} pre-tokenizer"
        raise UserError(f"the tokenizer ({kind}) is neither byte-level BPE nor characters: llama.cpp's GPT-2 "
                        "cannot read text as it does")
    for added in saved.get("added_tokens", []):
        pieces[added["content"]] = added["id"]
    by_id = {i: piece for piece, i in pieces.items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has id {max(by_id)}, past the model's {vocab_size}-token vocabulary")
    special = {a["id"] for a in saved.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:  # a padded embedding row: no text stands for it
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return {"tokens": tokens, "types": types, "merges": merges, "bos": bos, "eos": eos, "notes": notes}


def _gpt2_byte_level(saved):
    """Whether a `tokenizers` BPE splits text as GPT-2 does: its regex, then bytes, nothing before."""
    pre = saved.get("pre_tokenizer") or {}
    return (saved.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space"))


_BYTES = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def byte_level(text):
    """`text` in GPT-2's byte alphabet (one printable character per UTF-8 byte: " " is "Ġ")."""
    return "".join(piece for piece, _ in _BYTES.pre_tokenize_str(text))


def _character_merges(pieces):
    """Merges that rebuild each multi-byte character from its bytes, and nothing else: a merge's
    left side always starts with a UTF-8 lead byte and its right side is a continuation byte, so
    none can join two characters."""
    merges = {}
    for piece in pieces:
        for k in range(1, len(piece)):
            merges.setdefault(f"{piece[:k]} {piece[k]}", None)
    return list(merges)


def _add_vocabulary(writer, vocab):
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    # llama.cpp refuses a "gpt2" vocabulary without merges and gguf writes no empty array: characters
    # of one byte each get a merge no text can use (the byte 0xFF, "ÿ" here, never occurs in UTF-8)
    writer.add_token_merges(vocab["merges"] or [NEVER_MERGED])
    if vocab["bos"] is not None:
        writer.add_bos_token_id(vocab["bos"])
    if vocab["eos"] is not None:
        writer.add_eos_token_id(vocab["eos"])
    writer.add_add_bos_token(False)  # as the folder's tokenizer: text is encoded without a BOS in front
    writer.add_add_eos_token(False)


def _add_tensors(writer, model, qtype):
    """Every weight under llama.cpp's GPT-2 name; the output layer only when it is not the tied
    embedding (llama.cpp then reuses token_embd). Returns the names stored as f16 instead of qtype."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, model.config.n_layer)
    always_f32 = {gguf.TENSOR_NAMES[t] for t in ALWAYS_F32}
    tied = model.lm_head.weight is model.transformer.wte.weight
    fell_back = []
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new_name is not None, f"no GGUF name for {name}"
        data = tensor.detach().float().numpy()
        if name.endswith(CONV1D_WEIGHTS):
            data = np.ascontiguousarray(data.T)  # Conv1D stores (in, out); llama.cpp multiplies (out, in)
        target = qtype
        if data.ndim == 1 or new_name.removesuffix(".weight") in always_f32:
            target = gguf.GGMLQuantizationType.F32
        try:
            stored = gguf.quants.quantize(data, target)
        except gguf.QuantError:  # a row length the block size does not divide
            target = gguf.GGMLQuantizationType.F16
            stored = gguf.quants.quantize(data, target)
            fell_back.append(new_name)
        writer.add_tensor(new_name, stored, raw_dtype=target)
    return fell_back
