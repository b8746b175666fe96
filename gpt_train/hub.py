"""Publishing model folders to the Hugging Face Hub: from a training run, in the background, or once.

What goes up is the model part of a checkpoint folder: the top-level files its manifest lists
(config.json, model.safetensors, generation_config.json, tokenizer files, the README.md model
card), a LoRA run's adapter/, and training_config.json, loss.png, eval_results.json and the Hub
benchmarks' .eval_results/*.yaml; never training_state/ (optimizer state is large and only resuming
needs it), metrics.jsonl, TensorBoard's runs/, a user's own files, a symbolic link
(whose target could be a token file) or half-written files. Each push uploads a snapshot taken when it is
queued (hard links, or copies where linking fails): checkpoints replace their files with new
ones (gpt_train.checkpoint moves them into place), so a later save cannot change what an
upload in flight reads.

The token is huggingface_hub's business: HfApi finds it in HF_TOKEN or the stored login
(`hf auth login`). gpt-train never reads it into a setting, prints it, logs it or writes it.

Not here: writing the folder (gpt_train.checkpoint, gpt_train.model_card).
"""
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

from huggingface_hub import HfApi, get_token

from gpt_train.errors import UserError, first_line
from gpt_train.out_dir import (ADAPTER_DIR, EVAL_RESULTS, HUB_EVAL_RESULTS, HUB_SNAPSHOT_PREFIX, LOSS_CHART,
                               MODEL_FOLDER_FILES, RUN_CONFIG, SHARDED_WEIGHTS, TrainerState, is_model_folder)

RUN_EXTRAS = (RUN_CONFIG, LOSS_CHART, EVAL_RESULTS)  # published beside the model: how it was made


def check_login():
    """Fail before training rather than after it: an upload without a token cannot work."""
    if get_token() is None:
        raise UserError("pushing to the Hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")


def published_files(folder):
    """The files of `folder` that make the published model: the model folder's own (those its
    checkpoint's manifest lists, or the names transformers writes when it has none), the run's
    settings, chart and scores (the Hub benchmarks' in .eval_results/, where the Hub reads them). Never
    the log, never a symbolic link (its target may be anything)."""
    state = TrainerState.read_if_any(folder)
    if state:  # the model folder's own files, and a LoRA run's adapter/ (gpt_train.lora) beside them
        names = {name for name in state.files if "/" not in name or name.startswith(ADAPTER_DIR + "/")}
    else:  # a model folder saved without gpt-train's checkpoint
        names = {name for name in os.listdir(folder) if name in MODEL_FOLDER_FILES or SHARDED_WEIGHTS.fullmatch(name)}
    names |= set(RUN_EXTRAS)
    hub_results = os.path.join(folder, HUB_EVAL_RESULTS)
    if os.path.isdir(hub_results):
        names |= {f"{HUB_EVAL_RESULTS}/{name}" for name in os.listdir(hub_results) if name.endswith(".yaml")}
    inside = os.path.realpath(folder) + os.sep  # adapter/ itself a link: its files are not ours either
    return sorted(name for name in names if os.path.isfile(os.path.join(folder, name))
                  and not os.path.islink(os.path.join(folder, name))
                  and os.path.realpath(os.path.join(folder, name)).startswith(inside))


def snapshot(folder):
    """A private copy of the published files that later saves into `folder` cannot touch, and
    their names."""
    copy = tempfile.mkdtemp(prefix=HUB_SNAPSHOT_PREFIX, dir=folder)  # hard links need one file system
    names = published_files(folder)
    for name in names:
        src, dst = os.path.join(folder, name), os.path.join(copy, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)
        if os.path.islink(dst):  # replaced by a link since it was listed: not ours to send
            os.remove(dst)
            names.remove(name)
    return copy, names


def upload_snapshot(copy, repo_id, private, commit_message):
    """Create the repo if needed and commit the `snapshot` to it, then remove it; returns the commit's URL."""
    try:
        api = HfApi()  # its token: HF_TOKEN or the stored login
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=copy, commit_message=commit_message).commit_url
    finally:
        shutil.rmtree(copy, ignore_errors=True)


class HubPusher:
    """A training run's uploads: queued after saves, run one at a time in a background thread.

    Inactive (every call a no-op) unless push_to_hub is set, and on every process but the main
    one. A failed upload is printed as a warning and training goes on; `finish` waits for the
    queue and reports each upload's result.
    """

    def __init__(self, cfg, report, is_main_process=None):
        if is_main_process is None:
            from accelerate import PartialState  # deferred: gpt_train.config imports this module without torch
            is_main_process = PartialState().is_main_process
        self.active = cfg.push_to_hub and is_main_process
        if self.active:
            check_login()
        self.cfg, self.report = cfg, report
        self.pending = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload") if self.active else None

    def after_save(self, out_dir, iter_num):
        if self.active and self.cfg.hub_strategy == "every_save":
            self._queue(out_dir, f"Training in progress, iteration {iter_num}")

    def finish(self, out_dir, iter_num):
        """Push the final folder ('end'), then wait for every upload and report how each went."""
        if not self.active:
            return
        if self.cfg.hub_strategy == "end":
            if is_model_folder(out_dir):
                self._queue(out_dir, f"End of training, iteration {iter_num}")
            else:
                self.report(f"warning: no checkpoint in {out_dir}, nothing pushed to {self.cfg.hub_model_id}")
        if self.pending:
            self.report(f"waiting for {len(self.pending)} upload(s) to {self.cfg.hub_model_id}")
        error = None
        for message, names, future in self.pending:
            error = future.exception()
            if error is None:
                self.report(f"pushed '{message}' to the Hub ({', '.join(names)}): {future.result()}")
            else:
                self.report(f"warning: upload '{message}' to {self.cfg.hub_model_id} failed: {first_line(error)}")
        self.pending = []
        self.executor.shutdown()
        if error is not None:  # the last upload failed: the Hub does not hold the run's final folder
            raise UserError(f"training finished and {out_dir} is complete, but its upload to {self.cfg.hub_model_id} "
                            f"failed ({first_line(error)}): push it again with `python -m gpt_train.push {out_dir} "
                            f"{self.cfg.hub_model_id}`")

    def _queue(self, out_dir, message):
        copy, names = snapshot(out_dir)
        future = self.executor.submit(upload_snapshot, copy, self.cfg.hub_model_id, self.cfg.hub_private_repo,
                                      message)
        future.add_done_callback(lambda f: self._warn_if_failed(message, f))
        self.pending.append((message, names, future))

    def _warn_if_failed(self, message, future):
        if future.exception() is not None:  # said at once; training goes on regardless
            self.report(f"warning: upload '{message}' to {self.cfg.hub_model_id} failed "
                        f"({first_line(future.exception())}); training continues")
