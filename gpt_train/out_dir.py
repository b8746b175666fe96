"""What an out_dir holds: its file names, the loop's saved state, and the run's metrics log.

    out_dir/
      config.json, model.safetensors, generation_config.json, tokenizer files   <- the model
      README.md                                                                 <- its model card
      training_config.json                                                      <- the run's settings
      metrics.jsonl                                                             <- one line per log/eval
      loss.png                                                                  <- the chart of it
      runs/<project>/   TensorBoard's event files (report_to='tensorboard')     <- the same numbers
      eval_results.json                                                         <- lm-eval's scores, if judged
      .eval_results/<task>.yaml                                                 <- the Hub benchmarks among them
      training_state/   accelerator.save_state files, and trainer_state.json    <- to resume

Light on purpose (no torch): the plot command, the Hub push and the progress summary read an
out_dir without loading a model. Not here: writing checkpoints safely (gpt_train.checkpoint).
"""
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields

from gpt_train.config import tokens_per_iter
from gpt_train.errors import UserError, first_line

MODEL_CONFIG = "config.json"
WEIGHTS = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
MODEL_FILES = (MODEL_CONFIG, WEIGHTS, GENERATION_CONFIG)
MODEL_CARD = "README.md"
RUN_CONFIG = "training_config.json"
METRICS = "metrics.jsonl"
LOSS_CHART = "loss.png"
TENSORBOARD_DIR = "runs"  # report_to='tensorboard': Accelerate writes <project>/ in it (Trainer's name for it)
EVAL_RESULTS = "eval_results.json"  # lm-eval's scores (gpt_train.evaluate)
HUB_EVAL_RESULTS = ".eval_results"  # the scores of benchmarks on the Hub, one YAML file each, in the Hub's format
STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
ADAPTER_DIR = "adapter"  # a LoRA run's adapter, as peft writes it (gpt_train.lora)
OLD_SUFFIX = ".old"  # a checkpoint's previous folder (training_state/, adapter/), removed once the new one is in
OLD_STATE_DIR = STATE_DIR + OLD_SUFFIX
STAGING_DIR = ".checkpoint-staging"  # a save being written; incomplete until renamed
COMMITTED_DIR = ".checkpoint-committed"  # a complete save whose files are being moved into place
LOCK = ".gpt-train.lock"  # held by the one training run that writes here (gpt_train.run_lock)
HUB_SNAPSHOT_PREFIX = ".hub-upload-"  # a push's private copy of the model files (gpt_train.hub)
# What transformers' save_pretrained writes for a GPT-2 and its tokenizers (sharded weights only
# past 50 GB), and the card: a model folder's own files, the only ones pushed or overwritten.
TOKENIZER_FILE = "tokenizer.json"  # the `tokenizers` tokenizer: what AutoTokenizer loads first
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG, "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
# files.atomic_path's temporary sibling of NAME, left behind when a write was killed
ATOMIC_TEMPORARY = re.compile(r"(?P<name>.+)\.[a-z0-9_]{8}\.tmp")
SHARDED_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5}\.safetensors|\.safetensors\.index\.json)")
# Any of these in out_dir means a training run wrote there.
RUN_FILES = (METRICS, RUN_CONFIG, LOSS_CHART, TENSORBOARD_DIR, STATE_DIR, WEIGHTS, STAGING_DIR, COMMITTED_DIR,
             EVAL_RESULTS, HUB_EVAL_RESULTS)
# What a run leaves before its first checkpoint is committed: a restart may start it again.
BEFORE_FIRST_CHECKPOINT = (METRICS, RUN_CONFIG, LOSS_CHART, TENSORBOARD_DIR, STAGING_DIR)
MODEL_FOLDER_FILES = (*MODEL_FILES, *TOKENIZER_FILES, MODEL_CARD)
SAVED_FOLDERS_OLD = (OLD_STATE_DIR, ADAPTER_DIR + OLD_SUFFIX)
# The JSON objects from_pretrained reads when they are there: the older tokenizer files too
MODEL_JSON_FILES = (MODEL_CONFIG, GENERATION_CONFIG, TOKENIZER_CONFIG, "special_tokens_map.json",
                    "added_tokens.json")
DAMAGED_ADVICE = "restore the folder from a copy, or point at another model"
JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


def written_by_gpt_train(name):
    """Whether `name`, a top-level entry of out_dir, is one gpt-train writes there: the only names
    an overwrite deletes, whatever a file in the folder lists."""
    temporary = ATOMIC_TEMPORARY.fullmatch(name)
    return (name in MODEL_FOLDER_FILES or name in RUN_FILES or name in (ADAPTER_DIR, *SAVED_FOLDERS_OLD)
            or name.startswith(HUB_SNAPSHOT_PREFIX) or bool(SHARDED_WEIGHTS.fullmatch(name))
            or bool(temporary and written_by_gpt_train(temporary["name"])))


def is_model_folder(folder):
    """Whether `folder` holds a model from_pretrained can load (its config and weights)."""
    return all(os.path.isfile(os.path.join(folder, name)) for name in (MODEL_CONFIG, WEIGHTS))


def has_checkpoint(out_dir):
    """Whether out_dir holds a checkpoint to resume (a committed save still being moved in counts)."""
    return (os.path.isfile(os.path.join(out_dir, STATE_DIR, TRAINER_STATE))
            or os.path.isdir(os.path.join(out_dir, COMMITTED_DIR)))


def check_model_folder(folder, advice=""):
    """A UserError naming what is missing unless `folder` is a model folder; `advice` ends it."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} does not exist{advice}")
    missing = [name for name in (MODEL_CONFIG, WEIGHTS) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(f"{folder} is not a model folder ({', '.join(missing)} missing){advice}")


def check_model_files(folder, advice=DAMAGED_ADVICE):
    """A one-line UserError naming the first of a model folder's files that from_pretrained
    would fail on with a traceback: a JSON file cut short or overwritten, settings in config.json
    of the wrong type, a tokenizer.json that is no tokenizer, weights whose safetensors header
    is broken or that end early. Files not there are left to check_model_folder and the loaders.

    Cheap: the JSON files are small, and of the weights only the header is read (and their
    size checked against it), so weights overwritten past their header pass.
    """
    from huggingface_hub.errors import StrictDataclassError  # deferred: this module stays light
    from safetensors import SafetensorError, safe_open
    from tokenizers import Tokenizer
    from transformers import CONFIG_MAPPING

    def damaged(name, why, what):
        return UserError(f"{os.path.join(folder, name)} is damaged ({why}): it is not {what}; {advice}")

    texts, saved = {}, {}
    for name in (*MODEL_JSON_FILES, TOKENIZER_FILE):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                texts[name] = f.read()
            saved[name] = json.loads(texts[name])
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
            raise damaged(name, first_line(e), "a readable JSON file") from None
        if not isinstance(saved[name], dict):
            raise damaged(name, f"it holds {JSON_TYPES.get(type(saved[name]), 'a value')}", "a JSON object")
    model_type = saved.get(MODEL_CONFIG, {}).get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:  # other types: the loaders' own errors
        try:  # what from_pretrained does with it: settings of the wrong type fail here
            CONFIG_MAPPING[model_type].from_dict(saved[MODEL_CONFIG])
        except StrictDataclassError as e:  # its first line only names the field, the last says what is wrong
            why = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
            raise damaged(MODEL_CONFIG, why, f"a valid {model_type} config") from None
        except ValueError as e:
            raise damaged(MODEL_CONFIG, first_line(e), f"a valid {model_type} config") from None
    if TOKENIZER_FILE in saved:
        try:
            Tokenizer.from_str(texts[TOKENIZER_FILE])
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise damaged(TOKENIZER_FILE, "tokenizers: " + str(e).strip().split("\n")[0][:200],
                          "a tokenizer the tokenizers library can read") from None
    path = os.path.join(folder, WEIGHTS)
    if os.path.isfile(path):
        try:
            with safe_open(path, framework="numpy"):  # the header, checked against the file's size
                pass
        except (SafetensorError, OSError) as e:
            raise damaged(WEIGHTS, first_line(e), "a readable safetensors file") from None


@dataclass
class TrainerState:
    """The loop's own state in a checkpoint, beside Accelerate's: training_state/trainer_state.json."""

    iter_num: int
    best_val_loss: float
    tokens_seen: int = 0
    tracker_run_id: str | None = None  # the wandb run a resume continues
    skipped_steps: int = 0  # steps skipped for a non-finite loss (skip_nonfinite_steps)
    val_bytes_per_token: float | None = None  # bits per byte = val loss / ln 2 / this
    best_iter: int | None = None  # the iteration best_val_loss was measured at
    val_loss: float | None = None  # of the weights saved here; None if saved without an evaluation
    stopped_by: str | None = None  # 'SIGINT' or 'SIGTERM' when saved because the run was stopped
    micro_batch: int | None = None  # the micro-batch auto_find_batch_size chose (None: batch_size, as set)
    config: dict = field(default_factory=dict)  # the run's resolved settings
    files: dict = field(default_factory=dict)  # every file of the checkpoint: its size and sha256

    @classmethod
    def read(cls, out_dir):
        """The state of out_dir's checkpoint, or a one-line error if it is missing or unreadable."""
        path = os.path.join(out_dir, STATE_DIR, TRAINER_STATE)
        saved = _read_json_object(
            path, f"nothing to resume in {out_dir}: no {STATE_DIR}/{TRAINER_STATE} found. Train with "
                  "init_from='scratch' first, or point out_dir at a finished checkpoint",
            "is corrupt ({}): the checkpoint cannot be resumed")
        problem = _state_problem(saved)
        if problem:
            raise UserError(f"{path} is corrupt ({problem}): the checkpoint cannot be resumed")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    @classmethod
    def read_if_any(cls, out_dir):
        """The state of out_dir's checkpoint, or None where there is none that can be read (a new
        folder, a model saved without gpt-train, a damaged state): for those that only report it."""
        try:
            return cls.read(out_dir)
        except UserError:
            return None

    def to_dict(self):
        return asdict(self)


def _count(v):
    return type(v) is int and v >= 0


def _number(v):
    return type(v) in (int, float)


# What each field of trainer_state.json must hold (bool is not a number here: JSON's true is no count).
STATE_SCHEMA = {
    "iter_num": (_count, "a whole number >= 0"),
    "best_val_loss": (_number, "a number"),
    "tokens_seen": (_count, "a whole number >= 0"),
    "tracker_run_id": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "skipped_steps": (_count, "a whole number >= 0"),
    "val_bytes_per_token": (lambda v: v is None or (_number(v) and v > 0), "a positive number or null"),
    "best_iter": (lambda v: v is None or _count(v), "a whole number >= 0 or null"),
    "val_loss": (lambda v: v is None or _number(v), "a number or null"),
    "stopped_by": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "micro_batch": (lambda v: v is None or (_count(v) and v > 0), "a whole number >= 1 or null"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "files": (lambda v: isinstance(v, dict), "an object"),
}
REQUIRED_STATE = ("iter_num", "best_val_loss")


def _state_problem(saved):
    """What is wrong with a trainer_state.json's contents, in a few words; None if nothing."""
    for name in REQUIRED_STATE:
        if name not in saved:
            return f"no {name} in it"
    for name, (valid, what) in STATE_SCHEMA.items():
        if name in saved and not valid(saved[name]):
            return f"{name} must be {what}, got {saved[name]!r:.60}"
    for name, entry in saved.get("files", {}).items():
        if not is_inside_relative_path(name):
            return f"it lists {name!r:.80}, which is not a path inside out_dir"
        if not isinstance(entry, dict) or not _count(entry.get("size")) or \
                not isinstance(entry.get("sha256", ""), str):
            return f"its entry for {name!r:.80} is not {{size, sha256}}"
    return None


def is_inside_relative_path(name):
    """Whether `name` is a plain relative path that cannot leave the folder it is joined to."""
    return (isinstance(name, str) and name != "" and not os.path.isabs(name) and "\\" not in name
            and all(part not in ("", ".", "..") for part in name.split("/")))


def read_run_config(out_dir):
    """The settings of the run in out_dir, as its last session saved them."""
    return _read_json_object(
        os.path.join(out_dir, RUN_CONFIG), f"nothing to resume in {out_dir}: no {RUN_CONFIG} found. Train with "
                                           "init_from='scratch' first, or point out_dir at the folder of a run",
        "is unreadable ({}): the run's settings cannot be resumed")


def _read_json_object(path, missing, broken):
    """The JSON object in `path`; if there is none, the one-line error `missing`, if it cannot be
    read, `path` and `broken` with the reason in its {}."""
    if not os.path.isfile(path):
        raise UserError(missing)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} {broken.format(e)}") from None
    return saved


def last_checkpoint_note(out_dir):
    """What a run that stops early leaves to continue from, in one sentence for its error line."""
    state = TrainerState.read_if_any(out_dir)
    if state is None:
        return f"{out_dir} has no checkpoint yet; start the run again"
    return (f"the last checkpoint in {out_dir}, at iteration {state.iter_num:,}, is intact; continue with "
            "--init_from=resume")


def run_tokens_per_iter(out_dir):
    """Tokens per iteration of the run in out_dir, from its settings; None if they cannot be read."""
    try:
        return tokens_per_iter(read_run_config(out_dir))
    except (UserError, TypeError):
        return None


def previous_run(out_dir, allow=()):
    """What a training run left in out_dir, in a few words; '' if nothing (or only the `allow`ed
    files): a new run must not mix with it, nor replace a model folder's files unasked."""
    found = sorted(n for n in os.listdir(out_dir) if written_by_gpt_train(n)) if os.path.isdir(out_dir) else []
    if set(found) <= set(allow):
        return ""
    state = TrainerState.read_if_any(out_dir)
    return f"a checkpoint at iteration {state.iter_num:,}" if state else ", ".join(found)


class MetricsReader:
    """A run's metrics.jsonl as records; later calls read only the lines added since (a run that
    is being written is read again cheaply, its unfinished last line left for next time).

    A log is not a checkpoint: a line that is not a record (a write cut short by a full disk, a
    hand edit) is skipped and counted in `skipped`, never an error."""

    def __init__(self, out_dir):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, METRICS)
        self.offset, self.records, self.skipped = 0, [], 0

    def read(self):
        if not os.path.isfile(self.path):
            raise UserError(f"{self.path} not found: is {self.out_dir} the out_dir of a gpt-train run?")
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break
                self.offset += len(line)
                record = _record(line)
                if record is None:
                    self.skipped += 1
                else:
                    self.records.append(record)
        return self.records


NUMERIC_METRICS = ("train/loss", "val/loss", "train/step_loss", "lr", "val/bpb")


def _record(line):
    """The metrics record on `line`, or None if it is not one that plots and summaries can use."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("event"), str) or \
            type(record.get("iter")) is not int:
        return None
    if any(k in record and (type(record[k]) not in (int, float)) for k in NUMERIC_METRICS):
        return None
    return record


def read_metrics(out_dir, event=None):
    """The records of out_dir's metrics.jsonl (those of one event, 'train' or 'eval', if given)."""
    return [r for r in MetricsReader(out_dir).read() if event is None or r.get("event") == event]


def best_eval(records):
    """(iteration, val loss) of the best evaluation among the records, None if there is none."""
    evals = [(r["iter"], r["val/loss"]) for r in records if r.get("event") == "eval" and "val/loss" in r]
    return min(evals, key=lambda e: e[1]) if evals else None
