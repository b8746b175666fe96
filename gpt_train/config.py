"""Settings: the `TrainConfig` dataclass and the preset loader shared by train, sample and bench.

Loading order is nanoGPT's: the dataclass defaults, then each preset file named on the
command line (plain Python that assigns names; several may be chained, later wins), then
`--key=value` overrides. Presets are executed into a private namespace, never into module
globals, so a config file written for nanoGPT runs unchanged. Every setting also answers to
its TrainingArguments name (`per_device_train_batch_size`, `max_steps`, ...).

Not here: what the settings do. That is the job of the modules that read them.
"""
import ast
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field, fields

from gpt_train.errors import UserError
from gpt_train.hub import HUB_STRATEGIES, check_repo_id

DTYPES = ("auto", "float32", "bfloat16", "float16")


def setting(default, help):
    """A dataclass field whose one-line help feeds `--help`."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # I/O and logging
    out_dir: str = setting("out", "folder for the model, its training state and metrics.jsonl")
    eval_interval: int = setting(2000, "evaluate train and val loss every this many iterations")
    log_interval: int = setting(1, "print the training loss every this many iterations")
    eval_iters: int = setting(200, "batches per split in each evaluation")
    eval_only: bool = setting(False, "evaluate once and exit")
    always_save_checkpoint: bool = setting(True, "save at every eval, not only when val loss improves")
    wandb_log: bool = setting(False, "log to Weights & Biases")
    wandb_project: str = setting("owt", "wandb project")
    wandb_run_name: str = setting("gpt2", "wandb run name")
    # publishing, with TrainingArguments' names; the token is HF_TOKEN or `hf auth login`, never a setting
    push_to_hub: bool = setting(False, "upload the model folder to the Hugging Face Hub")
    hub_model_id: str = setting("", "the Hub repository, 'user/name'; required with push_to_hub")
    hub_private_repo: bool = setting(False, "create the repository as private")
    hub_strategy: str = setting("every_save", "'every_save': each checkpoint as a commit; 'end': once at the end")
    # data and batching
    dataset: str = setting("openwebtext", "name of the prepared dataset under data/")
    data_dir: str = setting("", "folder with train.bin and val.bin; empty means data/<dataset>")
    gradient_accumulation_steps: int = setting(5 * 8, "micro-steps per optimizer step, summed over all processes")
    batch_size: int = setting(12, "micro-batch size per process")
    block_size: int = setting(1024, "context length in tokens")
    # model
    n_layer: int = setting(12, "transformer blocks")
    n_head: int = setting(12, "attention heads per block")
    n_embd: int = setting(768, "embedding width")
    dropout: float = setting(0.0, "dropout; 0 for pretraining, try 0.1+ for fine-tuning")
    bias: bool = setting(False, "learned biases in Linear and LayerNorm layers")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    # training (AdamW)
    learning_rate: float = setting(6e-4, "peak learning rate")
    max_iters: int = setting(600000, "optimizer steps in the run")
    weight_decay: float = setting(1e-1, "AdamW weight decay, applied to 2-D weights only")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 disables clipping")
    # learning-rate schedule
    decay_lr: bool = setting(True, "linear warmup then cosine decay; False keeps learning_rate constant")
    warmup_iters: int = setting(2000, "warmup steps")
    lr_decay_iters: int = setting(600000, "step at which the cosine reaches min_lr; ~max_iters per Chinchilla")
    min_lr: float = setting(6e-5, "floor of the schedule, ~learning_rate/10 per Chinchilla")
    # initialisation
    init_from: str = setting("scratch", "'scratch', 'resume', 'gpt2*', a Hub id or a local model folder")
    seed: int = setting(1337, "seed for weights, data sampling and dropout")
    # system
    backend: str = setting("nccl", "torch.distributed backend on GPUs; CPU runs always use gloo")
    device: str = setting("auto", "'auto' picks cuda, then mps, then cpu; or name one")
    dtype: str = setting("auto", "'auto' is bfloat16 where supported, else float32; or float32/bfloat16/float16")
    compile: bool = setting(True, "torch.compile the model")

    def validate(self):
        """Reject settings that cannot make a sensible run, before anything is touched."""
        positive = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps",
                    "batch_size", "block_size", "n_layer", "n_head", "n_embd", "max_iters")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "warmup_iters", "lr_decay_iters"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.decay_lr:
            if self.min_lr > self.learning_rate:
                raise UserError(f"min_lr ({self.min_lr}) is above learning_rate ({self.learning_rate}): "
                                "lower min_lr or set decay_lr=False")
            if self.warmup_iters > self.lr_decay_iters:
                raise UserError(f"warmup_iters ({self.warmup_iters}) is beyond lr_decay_iters "
                                f"({self.lr_decay_iters}): shorten the warmup or decay later")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.out_dir:
            raise UserError("out_dir must not be empty")
        if self.hub_strategy not in HUB_STRATEGIES:
            raise UserError(f"hub_strategy must be one of {', '.join(HUB_STRATEGIES)}, got {self.hub_strategy!r}")
        if self.push_to_hub:
            if not self.hub_model_id:
                raise UserError("push_to_hub=True needs hub_model_id: say where to push, --hub_model_id=user/name")
            check_repo_id(self.hub_model_id)
        return self

    @property
    def resolved_data_dir(self):
        return self.data_dir or os.path.join("data", self.dataset)

    def to_training_arguments(self):
        """The run in TrainingArguments' vocabulary, for people and tools that speak it."""
        args = {hf: getattr(self, ours) for hf, ours in FIELD_ALIASES.items()}
        args["report_to"] = ["wandb"] if self.wandb_log else []
        args["bf16"] = self.dtype == "bfloat16"
        args["fp16"] = self.dtype == "float16"
        args.update({name: getattr(self, name) for name in HUB_SETTINGS})
        return args

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2)


# Settings that have TrainingArguments' names already.
HUB_SETTINGS = ("push_to_hub", "hub_model_id", "hub_private_repo", "hub_strategy")

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


def load_config(argv, cls=TrainConfig):
    """Build a validated `cls` from argv: preset files and --key=value, in order."""
    values = {}
    for source, assignments in _layers(argv):
        values.update(_resolve_layer(cls, source, assignments))
    return cls(**values).validate()


def _layers(argv):
    """Yield (source, {name: value}) for each preset file, then one layer for all --key=value."""
    overrides = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise UserError(f"'{arg}' has no value: write --{key}=VALUE")
            overrides.pop(key, None)  # a repeated flag wins, as in nanoGPT's configurator
            overrides[key] = _parse_cli_value(raw)
        elif "=" in arg:
            raise UserError(f"'{arg}' looks like a setting: write --{arg}")
        else:
            yield arg, _read_preset(arg)
    yield "the command line", overrides


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
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise UserError(f"unknown setting '{key}' in {source}{hint}")
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
    expected = {"int": int, "float": float, "bool": bool, "str": str}.get(expected, expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is str and not isinstance(value, str) and source == "the command line":
        return str(value)  # --wandb_run_name=2024 is a name, not a number
    if type(value) is not expected:
        raise UserError(f"{key} must be {expected.__name__}, got {type(value).__name__} {value!r} "
                        f"(in {source})")
    return value
