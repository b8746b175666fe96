"""Settings: the `TrainConfig` dataclass, whose defaults and one-line helps are the reference,
and the checks that reject a setting before anything is touched.

Not here: reading them from presets and the command line (gpt_train.cli), rewriting them for a
resume or a loaded model (gpt_train.start), what they do (the modules that read them).
"""
import functools
import math
import os
from dataclasses import dataclass, field, fields, replace

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from gpt_train.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
HUB_STRATEGIES = ("end", "every_save")
OPTIMIZERS = ("adamw", "adamw_8bit", "muon")
FINETUNE_METHODS = ("full", "lora")
LR_SCHEDULES = ("cosine", "wsd")
REPORT_TO = ("wandb", "tensorboard", "trackio")  # Accelerate's trackers that gpt-train sets up


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


# setting() per --help group; io_, data_ and hub_ (PEP 8's trailing underscore) shadow neither the stdlib's
# io nor the sibling modules gpt_train.data and gpt_train.hub
io_, data_, model_shape = section("I/O and logging"), section("data and batching"), section("model")
training, schedule, init = section("training"), section("learning-rate schedule"), section("initialisation")
system, lm_eval = section("system"), section("lm-eval (pip install -r requirements-eval.txt)")
hub_ = section("hub (TrainingArguments' names; the token is HF_TOKEN or `hf auth login`, never a setting)")


@dataclass
class TrainConfig:
    out_dir: str = io_("out", "folder for the model, its training state and metrics.jsonl; or a store's URL "
                              "(s3://bucket/prefix, gs://..., hf://buckets/...): docs/out-dir.md")
    eval_interval: int = io_(2000, "evaluate train and val loss every this many iterations")
    log_interval: int = io_(1, "print the training loss every this many iterations")
    progress: bool = io_(True, "tqdm bars for long steps (eval), on a terminal only; TQDM_DISABLE=1 hides them too")
    eval_iters: int = io_(200, "batches per split in each evaluation")
    eval_only: bool = io_(False, "evaluate once and exit, writing nothing to out_dir")
    overwrite_output_dir: bool = io_(False, "train from scratch or a pretrained model into an out_dir that "
                                     "holds another run, replacing it")
    always_save_checkpoint: bool = io_(True, "save at every eval, not only when val loss improves")
    async_save: bool = io_(False, "write each checkpoint on a background thread: training stops only to copy the "
                                  "state to host memory (not under FSDP)")
    report_to: str = io_("none", "trackers besides metrics.jsonl, comma-separated: 'tensorboard' (event files in "
                         "out_dir/runs/<wandb_project>/), 'trackio' (Trackio's local store, TRACKIO_DIR), 'wandb' "
                         "(wandb_log=True); 'none': metrics.jsonl alone")
    wandb_log: bool = io_(False, "log to Weights & Biases")
    wandb_project: str = io_("owt", "project of the wandb and Trackio runs; TensorBoard's folder under out_dir/runs/")
    wandb_run_name: str = io_("gpt2", "name of the wandb and Trackio runs")

    dataset: str = data_("openwebtext", "name of the prepared dataset under data/")
    data_dir: str = data_("", "folder with train.bin and val.bin; empty means data/<dataset>")
    stream_from: str = data_("", "train straight from a stream instead of data_dir's bins: a Hub dataset id or local "
                             ".parquet/.jsonl/.txt files (globs allowed), read by datasets' streaming mode")
    stream_subset: str = data_("", "stream_from's configuration on the Hub, e.g. sample-10BT")
    stream_text_column: str = data_("text", "stream_from's column holding the text")
    stream_val_documents: int = data_(1000, "the stream's first documents held out as val (the next as many are the "
                                      "train-loss sample)")
    stream_repeat: bool = data_(False, "start the stream over when it ends; False saves and stops there")
    stream_allow_changed: bool = data_(False, "resume a streamed run although stream_from's local files changed "
                                              "since its checkpoint (it then reads other data than it would have)")
    tokenizer: str = data_("", "stream_from's tokenizer: a model folder or Hub id; empty means init_from's, else "
                           "GPT-2's")
    gradient_accumulation_steps: int = data_(5 * 8, "micro-steps per optimizer step, summed over all processes")
    batch_size: int = data_(12, "micro-batch size per process")
    auto_find_batch_size: bool = data_(False, "before training, probe for the largest micro-batch up to batch_size "
                                       "that fits the device, with the micro-steps that keep the tokens per iteration")
    block_size: int = data_(1024, "context length in tokens")

    n_layer: int = model_shape(12, "transformer blocks")
    n_head: int = model_shape(12, "attention heads per block")
    n_embd: int = model_shape(768, "embedding width")
    dropout: float = model_shape(0.0, "dropout; 0 for pretraining, try 0.1+ for fine-tuning")
    bias: bool = model_shape(False, "learned biases in Linear and LayerNorm layers")
    gradient_checkpointing: bool = model_shape(False, "recompute activations in backward to save memory")

    optimizer: str = training("adamw", "'adamw' (nanoGPT's), 'adamw_8bit' (bitsandbytes': 8-bit moments, a quarter "
                              "of the state) or 'muon': Muon for the blocks' matrices, AdamW for embeddings, "
                              "LayerNorms and biases", choices=OPTIMIZERS)
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
    finetune_method: str = training("full", "'full' trains every weight; 'lora' trains low-rank adapters (peft) on "
                                    "init_from's model, the rest frozen", choices=FINETUNE_METHODS)
    lora_r: int = training(8, "rank of each LoRA adapter (finetune_method='lora')")
    lora_alpha: float = training(16.0, "LoRA scaling: an adapter's update is multiplied by lora_alpha / lora_r")
    lora_dropout: float = training(0.05, "dropout on the adapters' input")
    lora_target_modules: str = training("c_attn,c_proj,c_fc", "modules given adapters: GPT-2's attention and MLP")
    lora_base: str = training("", "for a LoRA resume whose base moved (a run folder copied to another machine): "
                              "where the base is now; checked against the checkpoint, and saved in its place")

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
    chunked_loss: bool = system(False, "compute the LM head and loss a chunk of tokens at a time with their gradients, "
                                "never holding the micro-batch's float32 logits (GPT-2's vocabulary: ~12 bytes per "
                                "token and entry less); the same loss and model folder")
    memory_check: bool = system(True, "refuse, before loading, a run whose estimated peak memory exceeds the "
                                "device's free memory, naming settings that would fit")
    ddp_timeout: int = system(1800, "seconds a process waits for the others at a collective before it gives up "
                                    "(NCCL notices a dead peer only then; gloo at once)")

    lm_eval_tasks: str = lm_eval("", "comma-separated lm-evaluation-harness tasks run on each saved checkpoint "
                                 "(on the eval_only model once), kept in eval_results.json and the model card")
    lm_eval_limit: int = lm_eval(0, "examples per lm-eval task; 0 runs them all")
    lm_eval_include_path: str = lm_eval("", "a folder of your own lm-eval task YAML files")

    push_to_hub: bool = hub_(False, "upload the model folder to the Hugging Face Hub")
    hub_model_id: str = hub_("", "the Hub repository, 'user/name'; required with push_to_hub")
    hub_private_repo: bool = hub_(False, "create the repository as private")
    hub_strategy: str = hub_("every_save", "'every_save': each checkpoint as a commit; 'end': once at the end",
                            choices=HUB_STRATEGIES)

    # Names given a value by a preset or the command line (load_config fills it in). Not a
    # field: a loaded model's shape overrides only the settings nobody chose.
    explicit = frozenset()

    def validate(self):
        """Reject settings that cannot make a sensible run, before anything is touched."""
        check_choices(self)
        positive = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps",
                    "batch_size", "block_size", "n_layer", "n_head", "n_embd", "max_iters", "ddp_timeout", "lora_r",
                    "stream_val_documents")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "warmup_iters", "lr_decay_iters",
                     "muon_learning_rate", "muon_momentum", "cooldown_iters", "lm_eval_limit", "lora_alpha"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        for f in fields(self):
            if f.type in (float, "float") and not math.isfinite(getattr(self, f.name)):
                raise UserError(f"{f.name} must be a finite number, got {getattr(self, f.name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("beta1", "beta2", "muon_momentum", "lora_dropout"):
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
        if not self.stream_from and (self.stream_subset or self.tokenizer):
            raise UserError(f"{'stream_subset' if self.stream_subset else 'tokenizer'} is for streamed runs: set "
                            "stream_from too, or prepare the data with data_prep/ (--tokenizer_from for a model's "
                            "tokenizer)")
        if self.auto_find_batch_size and self.stream_from:
            raise UserError("auto_find_batch_size does not run with stream_from (the stream packs its batches ahead): "
                            "set batch_size and gradient_accumulation_steps yourself")
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise UserError(f"out_dir {self.out_dir} is a file, not a folder: choose another --out_dir")
        if not 0 <= self.seed < 2 ** 32:
            raise UserError(f"seed must be between 0 and {2 ** 32 - 1} (numpy's range), got {self.seed}")
        for name in comma_names(self.report_to):
            if name not in (*REPORT_TO, "none"):
                raise UserError(f"report_to={name!r} is not a tracker gpt-train reports to: choose from none, "
                                f"{', '.join(REPORT_TO)} (several comma-separated)")
        plain_name = self.wandb_project not in ("", ".", "..") and not {"/", "\\"} & set(self.wandb_project)
        if "tensorboard" in self.trackers and not plain_name:
            raise UserError(f"wandb_project={self.wandb_project!r} names TensorBoard's folder under out_dir/runs/: "
                            "give a plain name")
        if self.push_to_hub:
            if not self.hub_model_id:
                raise UserError("push_to_hub=True needs hub_model_id: say where to push, --hub_model_id=user/name")
            check_repo_id(self.hub_model_id)
        return self

    @property
    def trackers(self):
        """The trackers this run reports to besides metrics.jsonl: report_to's, and wandb with wandb_log."""
        names = set(comma_names(self.report_to)) | ({"wandb"} if self.wandb_log else set())
        return [name for name in REPORT_TO if name in names]

    @property
    def resolved_data_dir(self):
        return self.data_dir or os.path.join("data", self.dataset)


TOKENS_PER_ITER = ("gradient_accumulation_steps", "batch_size", "block_size")  # their product


def tokens_per_iter(settings):
    """Tokens per optimizer step, all processes together, of a TrainConfig or a saved settings dict."""
    get = settings.get if isinstance(settings, dict) else functools.partial(getattr, settings)
    return math.prod(get(name) for name in TOKENS_PER_ITER)


def comma_names(text):
    """'a, b,,c' as ['a', 'b', 'c']: report_to's and TrainingArguments' comma-separated names."""
    return [name.strip() for name in text.split(",") if name.strip()]


def with_values(cfg, **changes):
    """A copy of cfg with some values changed, still knowing which names the user set."""
    new = replace(cfg, **changes)
    new.explicit = cfg.explicit
    return new


def check_repo_id(repo_id):
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"{repo_id!r} is not a Hub repository id ({e}): write it as 'user/name'") from None
