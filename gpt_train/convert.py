"""nanoGPT interop: a nanoGPT ckpt.pt becomes a Hugging Face model folder, and back; older
model folders brought up to date for other clients; a folder as a GGUF file for llama.cpp.

    python -m gpt_train.convert from-nanogpt out-shakespeare-char/ckpt.pt hf-char [--meta=data/shakespeare_char]
    python -m gpt_train.convert to-nanogpt hf-char nanogpt/ckpt.pt
    python -m gpt_train.convert upgrade out-shakespeare-char
    python -m gpt_train.convert to-gguf out-shakespeare-char [out.gguf] [--outtype=f16] [--force]

The two networks are the same GPT-2; only the storage differs. nanoGPT keeps nn.Linear
weights (out x in) where GPT-2 has Conv1D (in x out), `torch.compile` prefixes every name with
`_orig_mod.`, and `bias=False` means no bias tensors at all, which a GPT-2 folder expresses as
zero biases plus `bias: false` in config.json (see gpt_train.model). nanoGPT computes exact
GELU, so converted models say `activation_function="gelu"`.

The checkpoint is read with `torch.load(weights_only=True)`: tensors, numbers, strings and
plain containers, plus numpy number scalars in case a config value was one. A ckpt.pt that
needs anything else is refused rather than unpickled.

Not here: writing GGUF (gpt_train.gguf_export; this module only gives it its command), and
training state. The optimizer moments are not carried across; the folder is a
model to sample from, evaluate or fine-tune (`init_from=FOLDER`), and the ckpt.pt written
back is one nanoGPT's sample.py loads (nanoGPT's init_from='resume' also wants an optimizer).
"""
import filecmp
import os
import pickle
import sys
import tempfile
import zipfile

import numpy as np
import torch
from transformers import GenerationConfig, GPT2LMHeadModel

from gpt_train import run_lock
from gpt_train.checkpoint import refresh_manifest
from gpt_train.cli import command_parser
from gpt_train.errors import UserError, exit_on_user_error
from gpt_train.files import atomic_path
from gpt_train.gguf_export import OUTTYPES, to_gguf
from gpt_train.model import COMPILED_PREFIX, gpt2_config, read_model_config, set_generation_defaults
from gpt_train.out_dir import GENERATION_CONFIG, TrainerState, check_model_files, check_model_folder, read_run_config
from gpt_train.prepare import write_meta
from gpt_train.store import is_url, readable
from gpt_train.tokenizer import (GPT2_VOCAB, dataset_tokenizer, gpt2_tokenizer, is_gpt2_bpe, model_tokenizer,
                                 save_tokenizer)

LINEAR_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
CAUSAL_MASK = ".attn.bias"  # nanoGPT's mask buffer, present when it ran without flash attention
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
NANOGPT_LAYER_NORM_EPS = 1e-5
NANOGPT_INITIAL_BEST_VAL_LOSS = 1e9  # what nanoGPT's train.py starts from
# What a weights_only load may build besides tensors: numpy number scalars and their dtypes.
NUMPY_SCALAR_GLOBALS = [np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType,
                        np.dtypes.Float16DType, np.dtypes.Int64DType, np.dtypes.Int32DType, np.dtypes.BoolDType]


def load_nanogpt_checkpoint(path):
    """nanoGPT's ckpt.pt as a dict, loaded without running code from the file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        reason = str(e).split("\n\n")[-1].strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} holds objects other than tensors, numbers and strings ({reason}); "
                        "refusing to unpickle it") from None
    except (RuntimeError, EOFError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a nanoGPT checkpoint: it needs 'model' and 'model_args' entries")
    missing = [k for k in MODEL_ARGS if k not in ckpt["model_args"]]
    if missing:
        raise UserError(f"{path}: model_args lacks {', '.join(missing)}")
    return ckpt


def nanogpt_to_hf_state_dict(state_dict, hf_keys, bias):
    """Rename, transpose and fill in biases; `hf_keys` are the GPT-2 model's state dict keys."""
    weights = {}
    for name, tensor in state_dict.items():
        while name.startswith(COMPILED_PREFIX):  # nanoGPT strips it on resume, so do we
            name = name[len(COMPILED_PREFIX):]
        if name.endswith(CAUSAL_MASK):
            continue
        weights[name] = tensor.t().contiguous() if name.endswith(LINEAR_WEIGHTS) else tensor
    unexpected = sorted(set(weights) - set(hf_keys))
    if unexpected:
        raise UserError(f"not a nanoGPT GPT state dict: unexpected {', '.join(unexpected[:3])}")
    converted = {}
    for key, shape_like in hf_keys.items():
        if key in weights:
            converted[key] = weights[key]
        elif key == "lm_head.weight" and "transformer.wte.weight" in weights:
            converted[key] = weights["transformer.wte.weight"]  # tied: nanoGPT may store it once
        elif key.endswith(".bias") and not bias:
            converted[key] = torch.zeros(shape_like.shape, dtype=weights["transformer.wte.weight"].dtype)
        else:
            raise UserError(f"not a nanoGPT GPT state dict: {key} is missing"
                            + (" (model_args says bias=True)" if key.endswith(".bias") else ""))
    if not torch.equal(converted["lm_head.weight"], converted["transformer.wte.weight"]):
        raise UserError("lm_head.weight differs from transformer.wte.weight: nanoGPT ties them, "
                        "and a GPT-2 folder can only store them tied")
    return converted


def from_nanogpt(ckpt_path, out_dir, meta=None):
    """Write a model folder (weights, config, tokenizer) for the nanoGPT checkpoint at ckpt_path."""
    ckpt = load_nanogpt_checkpoint(ckpt_path)
    model_args = ckpt["model_args"]
    tokenizer = _tokenizer_for(ckpt, meta, int(model_args["vocab_size"]))
    shape = [int(model_args[k]) for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")]
    config = gpt2_config(*shape, float(model_args.get("dropout", 0.0)), bool(model_args["bias"]),
                         tokenizer.eos_token_id, layer_norm_epsilon=NANOGPT_LAYER_NORM_EPS)
    with torch.device("meta"):  # no time spent initialising weights that are overwritten next
        model = GPT2LMHeadModel(config)
    hf_keys = model.state_dict()
    weights = nanogpt_to_hf_state_dict(ckpt["model"], hf_keys, config.bias)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{ckpt_path}: weights do not fit model_args {dict(model_args)} ({e})") from None
    model.tie_weights()
    assert model.lm_head.weight is model.transformer.wte.weight
    model.eval()
    set_generation_defaults(model.config, model.generation_config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir, context=config.n_positions)
    return ckpt


def _tokenizer_for(ckpt, meta, vocab_size):
    """meta.pkl's characters (given, or found the way nanoGPT's sample.py finds it), else GPT-2 BPE."""
    if meta is None:
        dataset = (ckpt.get("config") or {}).get("dataset")
        guess = os.path.join("data", str(dataset)) if dataset else None
        if guess and os.path.isfile(os.path.join(guess, "meta.pkl")):
            print(f"using the vocabulary in {guess}/meta.pkl (the checkpoint's dataset)")
            meta = guess
    if meta is not None:
        folder = os.path.dirname(meta) if os.path.basename(meta) == "meta.pkl" else meta
        if not os.path.isdir(folder):
            raise UserError(f"--meta={meta}: give a dataset folder or its meta.pkl")
        tokenizer = dataset_tokenizer(folder)
        if len(tokenizer) > vocab_size:
            raise UserError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model only "
                            f"{vocab_size}: --meta names another dataset")
        return tokenizer
    if vocab_size < GPT2_VOCAB:
        raise UserError(f"the model has a {vocab_size}-token vocabulary, not GPT-2's: pass the dataset it was "
                        "trained on with --meta=data/<dataset> (the folder holding meta.pkl)")
    return gpt2_tokenizer()


def hf_to_nanogpt_state_dict(model):
    """nanoGPT names and layouts for a GPT2LMHeadModel's weights; bias-free models lose their zero biases."""
    bias = getattr(model.config, "bias", True)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".bias") and not bias:
            if torch.count_nonzero(tensor):
                raise UserError(f"config.json says bias=False but {name} is not zero: nanoGPT's bias-free "
                                "model cannot hold it")
            continue
        state[name] = tensor.t().contiguous() if name.endswith(LINEAR_WEIGHTS) else tensor
    state["lm_head.weight"] = state["transformer.wte.weight"]  # one tensor, stored once, as nanoGPT saves it
    return state


def to_nanogpt(out_dir, ckpt_path):
    """Write a nanoGPT ckpt.pt (and meta.pkl for char vocabularies) from the model folder out_dir."""
    check_model_folder(out_dir)
    check_model_files(out_dir)
    tokenizer = model_tokenizer(out_dir)
    stoi = tokenizer.get_vocab()
    chars = all(len(t) == 1 for t in stoi)  # nanoGPT's meta.pkl vocabulary
    if not (chars or is_gpt2_bpe(tokenizer)):
        raise UserError(f"{out_dir} has its own BPE tokenizer ({len(tokenizer):,} tokens), and nanoGPT reads only "
                        "GPT-2 BPE or a meta.pkl of characters: sample it with gpt-train's sample.py or "
                        "transformers instead")
    model = GPT2LMHeadModel.from_pretrained(out_dir)
    c = model.config
    if not c.tie_word_embeddings:
        raise UserError(f"{out_dir} has untied input and output embeddings; nanoGPT's GPT ties them")
    if c.activation_function != "gelu":
        print(f"note: the model uses {c.activation_function!r} and nanoGPT exact GELU: its logits will "
              "differ slightly, as with nanoGPT's own from_pretrained('gpt2')")
    if c.layer_norm_epsilon != NANOGPT_LAYER_NORM_EPS:
        print(f"note: layer_norm_epsilon is {c.layer_norm_epsilon}, nanoGPT uses {NANOGPT_LAYER_NORM_EPS}")
    try:  # a folder trained by gpt-train says where its run was; any other folder starts nanoGPT at 0
        saved = TrainerState.read(out_dir)
        iter_num, best_val_loss, settings = saved.iter_num, saved.best_val_loss, read_run_config(out_dir)
    except UserError:
        iter_num, best_val_loss, settings = 0, NANOGPT_INITIAL_BEST_VAL_LOSS, {}
    ckpt = {
        "model": hf_to_nanogpt_state_dict(model),
        "model_args": {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.n_positions,
                       "bias": bool(getattr(c, "bias", True)), "vocab_size": c.vocab_size,
                       "dropout": float(c.resid_pdrop)},
        "iter_num": iter_num,
        "best_val_loss": float(best_val_loss),
        "config": settings,
    }
    with atomic_path(ckpt_path) as tmp:
        torch.save(ckpt, tmp)
    if chars:  # nanoGPT's sample.py decodes with the meta.pkl beside its data
        ckpt_dir = os.path.dirname(os.path.abspath(ckpt_path))
        write_meta(ckpt_dir, {"vocab_size": len(stoi), "itos": {i: ch for ch, i in stoi.items()}, "stoi": stoi})
        print(f"wrote {os.path.join(ckpt_dir, 'meta.pkl')}: copy it to nanoGPT's data/<dataset>/ to sample")
    return ckpt


def upgrade(folder):
    """Rewrite a model folder's config, generation and tokenizer files as gpt-train writes them
    today (gpt_train.model.set_generation_defaults, gpt_train.tokenizer.save_tokenizer), in place.

    The weights are not touched. Each file is replaced atomically, and a checkpoint's manifest is
    updated to match, so the run still resumes. Returns the names of the files that changed.
    """
    check_model_folder(folder)
    check_model_files(folder)
    config = read_model_config(folder, folder)
    generation = GenerationConfig.from_model_config(config)
    if os.path.isfile(os.path.join(folder, GENERATION_CONFIG)):
        generation = GenerationConfig.from_pretrained(folder)
    set_generation_defaults(config, generation)
    changed = []
    with run_lock.hold(folder), tempfile.TemporaryDirectory(dir=folder, prefix=".upgrade-") as staging:
        config.save_pretrained(staging)
        generation.save_pretrained(staging)
        save_tokenizer(model_tokenizer(folder), staging, context=config.n_positions)
        for name in sorted(os.listdir(staging)):
            old = os.path.join(folder, name)
            if not os.path.isfile(old) or not filecmp.cmp(old, os.path.join(staging, name), shallow=False):
                os.replace(os.path.join(staging, name), old)
                changed.append(name)
        refresh_manifest(folder, changed)
    return changed


@exit_on_user_error
def main(argv=None):
    parser = command_parser("python -m gpt_train.convert", __doc__.split("\n\n")[2])
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{from-nanogpt,to-nanogpt,upgrade,to-gguf}")
    from_ = commands.add_parser("from-nanogpt", help="a nanoGPT ckpt.pt to a model folder")
    from_.add_argument("ckpt", metavar="CKPT_PT")
    from_.add_argument("out_dir", metavar="OUT_DIR")
    from_.add_argument("--meta", help="the char vocabulary: a dataset folder or its meta.pkl")
    to = commands.add_parser("to-nanogpt", help="a model folder to a nanoGPT ckpt.pt")
    to.add_argument("out_dir", metavar="OUT_DIR")
    to.add_argument("ckpt", metavar="CKPT_PT")
    up = commands.add_parser("upgrade", help="an older model folder's config, generation and tokenizer files, "
                                             "rewritten as gpt-train writes them today")
    up.add_argument("out_dir", metavar="OUT_DIR")
    gg = commands.add_parser("to-gguf", help="a model folder as one GGUF file (llama.cpp, Ollama, LM Studio)")
    gg.add_argument("out_dir", metavar="OUT_DIR")
    gg.add_argument("gguf", metavar="GGUF_FILE", nargs="?", help="default: OUT_DIR-OUTTYPE.gguf beside the folder")
    gg.add_argument("--outtype", default="f16", choices=list(OUTTYPES), help="how the weight matrices are stored")
    gg.add_argument("--force", action="store_true", help="replace GGUF_FILE if it exists")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if is_url(getattr(args, "out_dir", None)) and args.command != "to-nanogpt" and (
            args.command != "to-gguf" or not args.gguf):
        raise UserError(f"{args.command} writes {'beside' if args.command == 'to-gguf' else 'into'} OUT_DIR, and "
                        f"{args.out_dir} is on a store: " + ("name GGUF_FILE" if args.command == "to-gguf" else
                                                            "give a local folder"))
    if args.command in ("to-gguf", "to-nanogpt"):  # readers: a store's run is read from its cached copy
        args.out_dir = readable(args.out_dir, "OUT_DIR")
    if args.command == "to-gguf":
        path, notes = to_gguf(args.out_dir, args.gguf, args.outtype, force=args.force)
        for note in notes:
            print(f"note: {note}")
        print(f"wrote {path}")
    elif args.command == "upgrade":
        changed = upgrade(args.out_dir)
        print(f"upgraded {args.out_dir}: {', '.join(changed)}" if changed else f"{args.out_dir} is up to date")
    elif args.command == "from-nanogpt":
        ckpt = from_nanogpt(args.ckpt, args.out_dir, meta=args.meta)
        print(f"wrote {args.out_dir}: a GPT-2 model folder (iter {ckpt.get('iter_num', '?')} of the nanoGPT run)")
    else:
        to_nanogpt(args.out_dir, args.ckpt)
        print(f"wrote {args.ckpt}")


if __name__ == "__main__":
    main()
