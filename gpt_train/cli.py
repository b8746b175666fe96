"""The command line: preset files and `--key=value` into a settings dataclass, `--help`, and the
one-line errors of the commands that take paths. It reads nothing above the settings.

Loading order is nanoGPT's: the dataclass defaults, then each preset file named on the
command line (plain Python that assigns names; several may be chained, later wins), then
`--key=value` overrides. Presets are executed into a private namespace, never into module
globals, so a config file written for nanoGPT runs unchanged. Every setting also answers to
its TrainingArguments name (`per_device_train_batch_size`, `max_steps`, ...). Resolving needs
neither torch nor transformers, so `--help`, `--print_config` and a mistyped setting answer in
half a second instead of the six that importing torch, transformers and Accelerate takes.

Not here: the settings themselves and their checks (gpt_train.config), the commands that
dispatch (gpt_train.commands).
"""
import argparse
import ast
import difflib
import os
import sys
from dataclasses import fields
from types import UnionType

from gpt_train.config import TrainConfig, comma_names
from gpt_train.errors import UserError

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
    "run_name": "wandb_run_name",
    "project": "wandb_project",
}


def _report_to(assignments, source):
    """A layer's report_to (TrainingArguments': a name, comma-separated names or a list) as two settings:
    wandb_log for wandb, report_to for the others, so that a later wandb_log=False still turns wandb off.
    wandb_log=True in the same layer adds wandb to the list."""
    value = assignments["report_to"]
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise UserError(f"report_to must be a name, comma-separated names or a list of names, got {value!r} "
                        f"(in {source})")
    names = [name for text in names for name in comma_names(text)]
    if assignments.get("wandb_log") is False and "wandb" in names:
        raise UserError(f"{source} sets report_to={value!r} and wandb_log=False: keep one")
    others = ",".join(name for name in names if name != "wandb") or "none"
    return {**assignments, "report_to": others, "wandb_log": assignments.get("wandb_log") or "wandb" in names}


def _precision_flag(dtype):
    def convert(value):
        if not isinstance(value, bool):
            raise UserError(f"bf16/fp16 take True or False, got {value!r}")
        return "dtype", dtype if value else "float32"
    return convert


# TrainingArguments names whose values translate into one of our settings.
VALUE_ALIASES = {
    "bf16": _precision_flag("bfloat16"),
    "fp16": _precision_flag("float16"),
}


# How --help names the TrainingArguments spellings that translate values (VALUE_ALIASES, report_to).
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


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message):
        usage = " ".join(self.format_usage().split())  # argparse wraps a long usage over several lines
        raise UserError(f"{message}: usage: {usage.removeprefix('usage: ')}")


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
    overrides, bare = {}, None
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            overrides.pop(key, None)  # a repeated flag wins, as in nanoGPT's configurator
            overrides[key] = _parse_cli_value(raw) if eq else BARE_FLAG
            bare = None if eq else key
        elif "=" in arg:
            raise UserError(f"'{arg}' looks like a setting: write --{arg}")
        elif bare and not arg.endswith(".py"):  # argparse's habit: `--max_iters 200`
            raise UserError(f"'--{bare} {arg}': settings take --key=value, without a space: write --{bare}={arg}")
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
    if "report_to" in assignments and {"report_to", "wandb_log"} <= set(types) and \
            assignments["report_to"] is not BARE_FLAG:
        assignments = _report_to(assignments, source)
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
        resolved[name] = check_type(key, value, types[name], source)
    return resolved


def _alias_target(cls, key):
    """A function turning an alias's value into (field, value), or None if `key` is no alias of cls."""
    names = {f.name for f in fields(cls)}
    if key in FIELD_ALIASES and FIELD_ALIASES[key] in names:
        return lambda value: (FIELD_ALIASES[key], value)
    if key in VALUE_ALIASES and "dtype" in names:
        return VALUE_ALIASES[key]
    return None


def check_type(key, value, expected, source):
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
