"""Settings: the `TrainConfig` dataclass and the preset loader shared by train, sample and bench.

Loading order is nanoGPT's: the dataclass defaults, then each preset file named on the
command line (plain Python that assigns names; several may be chained, later wins), then
`--key=value` overrides. Presets are executed into a private namespace, never into module
globals, so a config file written for nanoGPT runs unchanged. Every setting also answers to
its TrainingArguments name (`per_device_train_batch_size`, `max_steps`, ...).

Not here: what the settings do. That is the job of the modules that read them.
"""
import argparse
import ast
import dataclasses
import difflib
import functools
import math
import os
import sys
from dataclasses import dataclass, field, fields
from types import UnionType

from gpt_train.errors import UserError
from gpt_train.hub import HUB_STRATEGIES, check_repo_id

DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd")


def setting(default, help, group="settings", choices=()):
    """A dataclass field whose one-line help (and group) feeds `--help`; `choices`: its only values."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


def check_choices(cfg):
    """The first setting whose value is not one of its choices, as a UserError."""
    for f in fields(cfg):
        if f.metadata.get("choices") and getattr(cfg, f.name) not in f.metadata["choices"]:
            raise UserError(f"{f.name} must be one of {', '.join(f.metadata['choices'])}, got {getattr(cfg, f.name)!r}")


def section(group):
    """setting() for the fields of one `--help` group."""
    return functools.partial(setting, group=group)


io, data, model_shape, training = section("I/O and logging"), section("data and batching"), section("model"), \
    section("training")
schedule, init, system = section("learning-rate schedule"), section("initialisation"), section("system")
lm_eval = section("lm-eval (pip install -r requirements-eval.txt)")
hub = section("hub (TrainingArguments' names; the token is HF_TOKEN or `hf auth login`, never a setting)")


@dataclass
class TrainConfig:
    out_dir: str = io("out", "folder for the model, its training state and metrics.jsonl")
    eval_interval: int = io(2000, "evaluate train and val loss every this many iterations")
    log_interval: int = io(1, "print the training loss every this many iterations")
    progress: bool = io(True, "tqdm bars for long steps (eval), on a terminal only; TQDM_DISABLE=1 hides them too")
    eval_iters: int = io(200, "batches per split in each evaluation")
    eval_only: bool = io(False, "evaluate once and exit, writing nothing to out_dir")
    overwrite_output_dir: bool = io(False, "train from scratch or a pretrained model into an out_dir that "
                                    "holds another run, replacing it")
    always_save_checkpoint: bool = io(True, "save at every eval, not only when val loss improves")
    wandb_log: bool = io(False, "log to Weights & Biases")
    wandb_project: str = io("owt", "wandb project")
    wandb_run_name: str = io("gpt2", "wandb run name")

    dataset: str = data("openwebtext", "name of the prepared dataset under data/")
    data_dir: str = data("", "folder with train.bin and val.bin; empty means data/<dataset>")
    gradient_accumulation_steps: int = data(5 * 8, "micro-steps per optimizer step, summed over all processes")
    batch_size: int = data(12, "micro-batch size per process")
    block_size: int = data(1024, "context length in tokens")

    n_layer: int = model_shape(12, "transformer blocks")
    n_head: int = model_shape(12, "attention heads per block")
    n_embd: int = model_shape(768, "embedding width")
    dropout: float = model_shape(0.0, "dropout; 0 for pretraining, try 0.1+ for fine-tuning")
    bias: bool = model_shape(False, "learned biases in Linear and LayerNorm layers")
    gradient_checkpointing: bool = model_shape(False, "recompute activations in backward to save memory")

    optimizer: str = training("adamw", "'adamw' (nanoGPT's) or 'muon': Muon for the blocks' matrices, AdamW for "
                              "embeddings, LayerNorms and biases", choices=OPTIMIZERS)
    learning_rate: float = training(6e-4, "peak learning rate (of AdamW)")
    max_iters: int = training(600000, "optimizer steps in the run")
    weight_decay: float = training(1e-1, "AdamW weight decay, applied to 2-D weights only")
    beta1: float = training(0.9, "AdamW beta1")
    beta2: float = training(0.95, "AdamW beta2")
    grad_clip: float = training(1.0, "clip the gradient norm to this; 0 disables clipping")
    skip_nonfinite_steps: bool = training(False, "skip steps whose loss is NaN/inf and go on (one host sync "
                                          "per step) instead of stopping the run")
    muon_learning_rate: float = training(0.02, "peak learning rate of Muon (optimizer='muon'), scaled by the "
                                         "schedule as learning_rate is")
    muon_momentum: float = training(0.95, "Muon's Nesterov momentum (optimizer='muon')")

    decay_lr: bool = schedule(True, "warmup then decay as lr_schedule says; False keeps learning_rate constant")
    lr_schedule: str = schedule("cosine", "'cosine' (nanoGPT's) or 'wsd': warmup, flat at the peak, then a linear "
                                "cooldown to min_lr over cooldown_iters ending at lr_decay_iters", choices=LR_SCHEDULES)
    cooldown_iters: int = schedule(0, "lr_schedule='wsd': iterations of the linear cooldown")
    warmup_iters: int = schedule(2000, "warmup steps")
    lr_decay_iters: int = schedule(600000, "step at which the cosine reaches min_lr; ~max_iters per Chinchilla")
    min_lr: float = schedule(6e-5, "floor of the schedule, ~learning_rate/10 per Chinchilla")

    init_from: str = init("scratch", "'scratch', 'resume', 'gpt2*', a Hub id or a local model folder")
    resume_from_checkpoint: bool | str = init(False, "True: continue out_dir's checkpoint if it has one, else start "
                                              "as init_from says (for restarted workers); a folder: continue the "
                                              "run in that folder")
    seed: int = init(1337, "seed for weights, data sampling and dropout")

    backend: str = system("nccl", "torch.distributed backend on GPUs; CPU runs always use gloo")
    device: str = system("auto", "'auto' picks cuda, then mps, then cpu; or name one")
    dtype: str = system("auto", "'auto' is bfloat16 on GPUs that support it, float16 on others, float32 on CPU "
                                "and MPS; or float32/bfloat16/float16", choices=DTYPES)
    compile: bool = system(True, "torch.compile the model")
    ddp_timeout: int = system(1800, "seconds a process waits for the others at a collective before it gives up "
                                    "(NCCL notices a dead peer only then; gloo at once)")

    lm_eval_tasks: str = lm_eval("", "comma-separated lm-evaluation-harness tasks run on each saved checkpoint "
                                 "(on the eval_only model once), kept in eval_results.json and the model card")
    lm_eval_limit: int = lm_eval(0, "examples per lm-eval task; 0 runs them all")
    lm_eval_include_path: str = lm_eval("", "a folder of your own lm-eval task YAML files")

    push_to_hub: bool = hub(False, "upload the model folder to the Hugging Face Hub")
    hub_model_id: str = hub("", "the Hub repository, 'user/name'; required with push_to_hub")
    hub_private_repo: bool = hub(False, "create the repository as private")
    hub_strategy: str = hub("every_save", "'every_save': each checkpoint as a commit; 'end': once at the end",
                            choices=HUB_STRATEGIES)

    # Names given a value by a preset or the command line (load_config fills it in). Not a
    # field: a loaded model's shape overrides only the settings nobody chose.
    explicit = frozenset()

    def validate(self):
        """Reject settings that cannot make a sensible run, before anything is touched."""
        check_choices(self)
        positive = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps",
                    "batch_size", "block_size", "n_layer", "n_head", "n_embd", "max_iters", "ddp_timeout")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "warmup_iters", "lr_decay_iters",
                     "muon_learning_rate", "muon_momentum", "cooldown_iters", "lm_eval_limit"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        for f in fields(self):
            if f.type in (float, "float") and not math.isfinite(getattr(self, f.name)):
                raise UserError(f"{f.name} must be a finite number, got {getattr(self, f.name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.decay_lr and self.min_lr > self.learning_rate:
            raise UserError(f"min_lr ({self.min_lr}) is above learning_rate ({self.learning_rate}): "
                            "lower min_lr or set decay_lr=False")
        if self.lr_schedule == "wsd" and self.cooldown_iters > self.lr_decay_iters - self.warmup_iters:
            raise UserError(f"cooldown_iters ({self.cooldown_iters}) does not fit between warmup_iters "
                            f"({self.warmup_iters}) and lr_decay_iters ({self.lr_decay_iters})")
        if self.optimizer == "muon" and self.dtype == "float16":
            raise UserError("optimizer='muon' with float16 loss scaling is not supported: use dtype bfloat16 or "
                            "float32")
        if not self.out_dir:
            raise UserError("out_dir must not be empty")
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise UserError(f"out_dir {self.out_dir} is a file, not a folder: choose another --out_dir")
        if not 0 <= self.seed < 2 ** 32:
            raise UserError(f"seed must be between 0 and {2 ** 32 - 1} (numpy's range), got {self.seed}")
        if self.push_to_hub:
            if not self.hub_model_id:
                raise UserError("push_to_hub=True needs hub_model_id: say where to push, --hub_model_id=user/name")
            check_repo_id(self.hub_model_id)
        return self

    @property
    def resolved_data_dir(self):
        return self.data_dir or os.path.join("data", self.dataset)


# TrainingArguments names that mean exactly one of our settings.
FIELD_ALIASES = {
    "per_device_train_batch_size": "batch_size",
    "max_steps": "max_iters",
    "warmup_steps": "warmup_iters",
    "adam_beta1": "beta1",
    "adam_beta2": "beta2",
    "max_grad_norm": "grad_clip",
    "eval_steps": "eval_interval",
    "logging_steps": "log_interval",
    "output_dir": "out_dir",
    "torch_compile": "compile",
}


def _report_to(value):
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise UserError(f"report_to must be 'wandb', 'none' or a list of those, got {value!r}")
    unknown = [n for n in names if n not in ("wandb", "none", "")]
    if unknown:
        raise UserError(f"report_to={unknown[0]!r} is not supported: gpt-train reports to 'wandb' or 'none'")
    return "wandb_log", "wandb" in names


def _precision_flag(dtype):
    def convert(value):
        if not isinstance(value, bool):
            raise UserError(f"bf16/fp16 take True or False, got {value!r}")
        return "dtype", dtype if value else "float32"
    return convert


# TrainingArguments names whose values translate into one of our settings.
VALUE_ALIASES = {
    "report_to": _report_to,
    "bf16": _precision_flag("bfloat16"),
    "fp16": _precision_flag("float16"),
}


# How --help names the TrainingArguments spellings of VALUE_ALIASES.
VALUE_ALIAS_HELP = {"wandb_log": "report_to='wandb'", "dtype": "bf16=True, fp16=True"}

HELP_FLAGS = ("--help", "-h")
PRINT_CONFIG_FLAG = "--print_config"


def load_config(argv, cls=TrainConfig):
    """Build a validated `cls` from argv: preset files and --key=value, in order.

    `--help` prints every setting of `cls` and exits; `--print_config` prints the resolved
    settings (as a preset file that reproduces them) and exits, before any data is touched.
    """
    if any(arg in HELP_FLAGS for arg in argv):
        print(help_text(cls))
        sys.exit(0)
    if PRINT_CONFIG_FLAG in argv:
        cfg = load_config([arg for arg in argv if arg != PRINT_CONFIG_FLAG], cls)
        print(preset_text(cfg))
        sys.exit(0)
    values = {}
    for source, assignments in _layers(argv):
        values.update(_resolve_layer(cls, source, assignments))
    cfg = cls(**values).validate()
    cfg.explicit = frozenset(values)
    return cfg


def with_values(cfg, **changes):
    """A copy of cfg with some values changed, still knowing which names the user set."""
    new = dataclasses.replace(cfg, **changes)
    new.explicit = cfg.explicit
    return new


# Settings a resumed run takes from the command line only: they say what to do with the run.
NOT_RESUMED = ("init_from", "out_dir", "eval_only", "overwrite_output_dir", "resume_from_checkpoint")
TOKENS_PER_ITER = ("gradient_accumulation_steps", "batch_size", "block_size")
# Settings whose change makes a resumed run differ from the uninterrupted one.
TRAJECTORY = ("dataset", "data_dir", "gradient_accumulation_steps", "batch_size", "block_size", "dropout",
              "learning_rate", "weight_decay", "beta1", "beta2", "grad_clip", "skip_nonfinite_steps", "decay_lr",
              "warmup_iters", "lr_decay_iters", "min_lr", "seed", "dtype", "optimizer", "muon_learning_rate",
              "muon_momentum", "lr_schedule", "cooldown_iters")


def with_saved_settings(cfg, saved, source):
    """Resume's settings: the saved run's (read from the file `source`), except what presets or
    the command line set. A saved value of the wrong type or out of range is a one-line error.

    Returns (settings, [one line per setting the command line changes]).
    """
    types = {f.name: f.type for f in fields(cfg)}
    saved = {k: _check_type(k, v, types[k], source) for k, v in saved.items() if k in types}
    inherited = {k: v for k, v in saved.items() if k not in cfg.explicit and k not in NOT_RESUMED}
    try:
        new = with_values(cfg, **inherited).validate()
    except UserError as e:
        raise UserError(f"{e} (from {source})") from None
    if "optimizer" in saved and saved["optimizer"] != new.optimizer:
        raise UserError(f"the run in {cfg.out_dir} trains with optimizer={saved['optimizer']!r}; a resume cannot "
                        f"switch it: start a new run from its weights with --init_from={cfg.out_dir} --out_dir=NEW_DIR")
    changes = []
    for name in sorted(cfg.explicit & saved.keys() - set(NOT_RESUMED)):
        if saved[name] == getattr(new, name):
            continue
        line = f"resume changes {name}: {saved[name]!r} -> {getattr(new, name)!r}"
        if name in TRAJECTORY:
            line += "; the run will not continue exactly as it would have"
        changes.append(line)
    tokens = {name: saved.get(name, getattr(new, name)) for name in TOKENS_PER_ITER}
    before, after = math.prod(tokens.values()), math.prod(getattr(new, name) for name in TOKENS_PER_ITER)
    if before != after:
        changes.append(f"resume changes the tokens per iteration: {before:,} -> {after:,}")
    return new, changes


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message}: usage: {self.format_usage().strip().removeprefix('usage: ')}")


def command_parser(prog, description):
    """The argv parser of commands that take paths (plot, convert, push): argparse, whose mistakes
    are one UserError line like every other setting's (argparse alone prints usage and error)."""
    return _OneLineErrors(prog=prog, description=description)


def help_text(cls, prog=None):
    """Every setting of `cls` with its default, type and meaning, in its groups."""
    prog = prog or _program_name()
    names = {f.name: f for f in fields(cls)}
    aliases = {ours: hf for hf, ours in FIELD_ALIASES.items() if ours in names}
    aliases.update({ours: hf for ours, hf in VALUE_ALIAS_HELP.items() if ours in names})
    width = max(len(f"--{f.name}={f.default!r}") for f in fields(cls)) + 2
    lines = [f"usage: {prog} [PRESET.py ...] [--key=value ...] [{PRINT_CONFIG_FLAG}] [--help]", "",
             "Settings resolve in order: these defaults, then each preset file (plain Python assigning",
             "names, later files win), then --key=value. A bare word is a string; True/False are booleans.",
             f"{PRINT_CONFIG_FLAG} shows the resolved settings and exits."]
    for group, members in groups(cls):
        lines += ["", f"{group}:"]
        for f in members:
            flag = f"--{f.name}={f.default!r}"
            alias = f" (also {aliases[f.name]})" if f.name in aliases else ""
            lines.append(f"  {flag:<{width}}{_type_name(f.type):<6} {f.metadata.get('help', '')}{alias}")
    return "\n".join(lines)


def groups(cls):
    """[(group title, [fields])] in the order the dataclass declares them (setting()'s group)."""
    grouped = {}
    for f in fields(cls):
        grouped.setdefault(f.metadata.get("group", "settings"), []).append(f)
    return list(grouped.items())


def preset_text(cfg):
    """The resolved settings as a preset file: save it and pass it back to get the same run."""
    lines = [f"# resolved settings of {type(cfg).__name__}"]
    lines += [f"{f.name} = {getattr(cfg, f.name)!r}" for f in fields(cfg)]
    return "\n".join(lines)


def _type_name(annotation):
    return str(annotation) if isinstance(annotation, UnionType) else annotation.__name__


def _program_name():
    """How the user started us: `python train.py` for a script, `gpt-train` for an entry point."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train.py"
    return f"python {name}" if name.endswith(".py") else name


def _layers(argv):
    """Yield (source, {name: value}) for each preset file, then one layer for all --key=value."""
    overrides = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            overrides.pop(key, None)  # a repeated flag wins, as in nanoGPT's configurator
            overrides[key] = _parse_cli_value(raw) if eq else BARE_FLAG
        elif "=" in arg:
            raise UserError(f"'{arg}' looks like a setting: write --{arg}")
        else:
            yield arg, _read_preset(arg)
    yield "the command line", overrides


BARE_FLAG = object()  # `--compile` with no value: True for a boolean setting, an error for others


def _parse_cli_value(raw):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        lowered = raw.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return raw  # a bare word is a string, as in nanoGPT's configurator


def _read_preset(path):
    if not os.path.isfile(path):
        raise UserError(f"preset file {path} not found")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise UserError(f"syntax error in preset {path}, line {e.lineno}: {e.msg}") from None
    namespace = {"__file__": os.path.abspath(path), "__name__": "__preset__"}
    try:
        exec(code, namespace)
    except Exception as e:  # the preset is the user's code; report where it broke
        raise UserError(f"preset {path} failed: {type(e).__name__}: {e}") from None
    # nanoGPT presets import modules (`import time`) and may define helpers: only plain
    # values are settings.
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, list, tuple))}


def _resolve_layer(cls, source, assignments):
    """Map one layer's names onto fields, checking names, types and double spellings."""
    types = {f.name: f.type for f in fields(cls)}
    known = list(types) + [a for a in {**FIELD_ALIASES, **VALUE_ALIASES} if _alias_target(cls, a)]
    resolved, spelled = {}, {}
    for key, value in assignments.items():
        if key in types:
            name = key
        elif _alias_target(cls, key):
            name, value = _alias_target(cls, key)(value)
        else:
            near = difflib.get_close_matches(key.replace("-", "_"), [*known, PRINT_CONFIG_FLAG], n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise UserError(f"unknown setting '{key}' in {source}{hint}")
        if value is BARE_FLAG:
            if bool not in getattr(types[name], "__args__", (types[name],)):
                raise UserError(f"'--{key}' has no value: write --{key}=VALUE")
            value = True
        if name in spelled:
            raise UserError(f"{source} sets {name} twice, as '{spelled[name]}' and '{key}': keep one")
        spelled[name] = key
        resolved[name] = _check_type(key, value, types[name], source)
    return resolved


def _alias_target(cls, key):
    """A function turning an alias's value into (field, value), or None if `key` is no alias of cls."""
    names = {f.name for f in fields(cls)}
    if key in FIELD_ALIASES and FIELD_ALIASES[key] in names:
        return lambda value: (FIELD_ALIASES[key], value)
    if key in VALUE_ALIASES and "dtype" in names and "wandb_log" in names:
        return VALUE_ALIASES[key]
    return None


def _check_type(key, value, expected, source):
    if isinstance(expected, UnionType):  # resume_from_checkpoint: True/False or a folder
        if type(value) in expected.__args__:
            return value
        if str in expected.__args__ and source == "the command line":
            return str(value)  # --resume_from_checkpoint=2024 is a folder's name
        raise UserError(f"{key} must be {_type_name(expected).replace(' | ', ' or ')}, got "
                        f"{type(value).__name__} {value!r} (in {source})")
    expected = {"int": int, "float": float, "bool": bool, "str": str}.get(expected, expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is str and not isinstance(value, str) and source == "the command line":
        return str(value)  # --wandb_run_name=2024 is a name, not a number
    if type(value) is not expected:
        raise UserError(f"{key} must be {expected.__name__}, got {type(value).__name__} {value!r} "
                        f"(in {source})")
    return value
