"""What an out_dir holds: its file names, the loop's saved state, and the run's metrics log.

    out_dir/
      config.json, model.safetensors, generation_config.json, tokenizer files   <- the model
      README.md                                                                 <- its model card
      training_config.json                                                      <- the run's settings
      metrics.jsonl                                                             <- one line per log/eval
      loss.png                                                                  <- the chart of it
      eval_results.json                                                         <- lm-eval's scores, if judged
      training_state/   accelerator.save_state files, and trainer_state.json    <- to resume

Light on purpose (no torch): the plot command, the Hub push and the progress summary read an
out_dir without loading a model. Not here: writing checkpoints safely (gpt_train.checkpoint).
"""
import json
import os
from dataclasses import asdict, dataclass, field, fields

from gpt_train.errors import UserError

MODEL_CONFIG = "config.json"
WEIGHTS = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
MODEL_FILES = (MODEL_CONFIG, WEIGHTS, GENERATION_CONFIG)
MODEL_CARD = "README.md"
RUN_CONFIG = "training_config.json"
METRICS = "metrics.jsonl"
LOSS_CHART = "loss.png"
EVAL_RESULTS = "eval_results.json"  # lm-eval's scores (gpt_train.evaluate)
STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
STAGING_DIR = ".checkpoint-staging"  # a save being written; incomplete until renamed
COMMITTED_DIR = ".checkpoint-committed"  # a complete save whose files are being moved into place
# Any of these in out_dir means a training run wrote there.
RUN_FILES = (METRICS, RUN_CONFIG, LOSS_CHART, STATE_DIR, WEIGHTS, STAGING_DIR, COMMITTED_DIR, EVAL_RESULTS)
# What a run leaves before its first checkpoint is committed: a restart may start it again.
BEFORE_FIRST_CHECKPOINT = (METRICS, RUN_CONFIG, LOSS_CHART, STAGING_DIR)


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


@dataclass
class TrainerState:
    """The loop's own state in a checkpoint, beside Accelerate's: training_state/trainer_state.json."""

    iter_num: int
    best_val_loss: float
    tokens_seen: int = 0
    tracker_run_id: str | None = None  # the wandb run a resume continues
    skipped_steps: int = 0  # steps skipped for a non-finite loss (skip_nonfinite_steps)
    val_bytes_per_token: float | None = None  # bits per byte = val loss / ln 2 / this
    config: dict = field(default_factory=dict)  # the run's resolved settings
    files: dict = field(default_factory=dict)  # every file of the checkpoint: size, sha256 of the model files

    @classmethod
    def read(cls, out_dir):
        """The state of out_dir's checkpoint, or a one-line error if it is missing or unreadable."""
        path = os.path.join(out_dir, STATE_DIR, TRAINER_STATE)
        saved = _read_json_object(
            path, f"nothing to resume in {out_dir}: no {STATE_DIR}/{TRAINER_STATE} found. Train with "
                  "init_from='scratch' first, or point out_dir at a finished checkpoint",
            "is corrupt ({}): the checkpoint cannot be resumed")
        known = {f.name for f in fields(cls)}
        try:
            if not isinstance(saved.get("iter_num"), int):
                raise ValueError("no iteration number in it")
            return cls(**{k: v for k, v in saved.items() if k in known})
        except (ValueError, TypeError) as e:
            raise UserError(f"{path} is corrupt ({e}): the checkpoint cannot be resumed") from None

    def to_dict(self):
        return asdict(self)


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


def tokens_per_iter(out_dir):
    """Tokens per iteration of the run in out_dir, from its settings; None if they cannot be read."""
    try:
        cfg = read_run_config(out_dir)
        return cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]
    except (UserError, KeyError, TypeError):
        return None


def previous_run(out_dir, allow=()):
    """What a training run left in out_dir, in a few words; '' if nothing (or only the `allow`ed
    files): a new run must not mix with it."""
    found = sorted(set(os.listdir(out_dir)) & set(RUN_FILES)) if os.path.isdir(out_dir) else []
    if set(found) <= set(allow):
        return ""
    try:
        return f"a checkpoint at iteration {TrainerState.read(out_dir).iter_num:,}"
    except UserError:
        return ", ".join(found)


class MetricsReader:
    """A run's metrics.jsonl as records; later calls read only the lines added since (a run that
    is being written is read again cheaply, its unfinished last line left for next time)."""

    def __init__(self, out_dir):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, METRICS)
        self.offset, self.records = 0, []

    def read(self):
        if not os.path.isfile(self.path):
            raise UserError(f"{self.path} not found: is {self.out_dir} the out_dir of a gpt-train run?")
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break
                self.offset += len(line)
                try:
                    self.records.append(json.loads(line))
                except ValueError:
                    raise UserError(f"{self.path} line {len(self.records) + 1} is not JSON") from None
        return self.records


def read_metrics(out_dir, event=None):
    """The records of out_dir's metrics.jsonl (those of one event, 'train' or 'eval', if given)."""
    return [r for r in MetricsReader(out_dir).read() if event is None or r.get("event") == event]


def best_eval(records):
    """(iteration, val loss) of the best evaluation among the records, None if there is none."""
    evals = [(r["iter"], r["val/loss"]) for r in records if r.get("event") == "eval" and "val/loss" in r]
    return min(evals, key=lambda e: e[1]) if evals else None
