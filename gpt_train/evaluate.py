"""Judge a model folder the way the field does: EleutherAI's lm-evaluation-harness on it.

    python -m gpt_train.evaluate out-gpt2 --tasks=hellaswag,arc_easy,piqa,lambada_openai
    gpt-eval out-shakespeare-char --tasks=my_ppl --include_path=my_tasks --limit=100

lm-eval's Python API runs on the folder as any lm-eval user would run it (its `hf` model), prints
lm-eval's table, writes the results to OUT_DIR/eval_results.json and adds them to the model card's
`model-index`, so the Hub shows them. The card and the checkpoint's manifest change together, so
the run still resumes; the next checkpoint's card drops the scores, which described older weights.
Tasks whose data is a Hub dataset (HellaSwag, ARC, PIQA, LAMBADA...) also get
OUT_DIR/.eval_results/<task>.yaml, the Hub's format for benchmark leaderboards (its
EvalResultEntry); a run on part of a benchmark (--limit) writes none, and the next checkpoint
removes them (gpt_train.checkpoint).
A char vocabulary has no BOS/EOS: its scoring tasks start from its newline (lm-eval's
prefix_token_id); its generation tasks are refused, as there is no end-of-text token to stop at.

A training run with `lm_eval_tasks` does the same on each checkpoint it saves (`during_training`).
Needs `pip install -r requirements-eval.txt` (or `pip install -e .[eval]`).
Not here: training-time losses (gpt_train.train); the model card's other sections (gpt_train.model_card).
"""
import contextlib
import datetime
import functools
import importlib.metadata
import json
import os
import random
import re
import sys

import numpy
from huggingface_hub import EvalResult, EvalResultEntry, ModelCard, eval_result_entries_to_yaml
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import get_session, yaml_dump

from gpt_train import run_lock
from gpt_train.cli import command_parser
from gpt_train.errors import UserError, exit_on_user_error, first_line
from gpt_train.files import atomic_path, write_json
from gpt_train.out_dir import (EVAL_RESULTS, HUB_EVAL_RESULTS, MODEL_CARD, TrainerState, check_model_files,
                               check_model_folder)
from gpt_train.store import is_url, model_folder

HUB_PROBE_TIMEOUT_S = 5
# The one score a benchmark's leaderboard gets: length-normalised accuracy where the task has it
# (HellaSwag, ARC, PIQA, as GPT-2-sized models are compared), else accuracy (LAMBADA), else its first metric
HEADLINE_METRICS = ("acc_norm", "acc")
HUB_DATASET_ID = re.compile(r"[\w.-]+/[\w.-]+")  # "owner/name"; lm-eval's local tasks say "json", "csv" or a path
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"  # the source the Hub links each score to


# lm-eval's generation settings that are numbers, as their type (an int is a float too)
NUMERIC_GEN_KWARGS = {"max_gen_toks": int, "temperature": (int, float), "top_p": (int, float), "top_k": int}


class NotInstalled(UserError):
    """lm-eval, an optional extra, is missing."""


def task_names(text):
    return [t for t in text.split(",") if t]


@functools.cache  # indexing lm-eval's ~15,000 task files takes 4-20 s on 2 cores: once per process
def task_manager(include_path=None, include_defaults=True):
    """lm-eval's TaskManager; UserError when lm-eval is missing."""
    try:
        from lm_eval.tasks import TaskManager  # deferred: an optional extra
    except ImportError:
        raise NotInstalled("lm-eval is not installed: pip install -r requirements-eval.txt") from None
    return TaskManager(include_path=include_path or None, include_defaults=include_defaults)


def check_tasks(tasks, include_path=None):
    """The task manager that knows every named task, or a UserError naming the first unknown one.
    Tasks all found in include_path are indexed alone: lm-eval's own need not be read for them."""
    if include_path:
        local = task_manager(include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = task_manager(include_path or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task {unknown[0]!r}: see `lm_eval ls tasks`, or add your own YAML "
                        "with --include_path")
    return manager


def evaluate(out_dir, tasks, batch_size=8, device="cpu", limit=None, include_path=None, gen_kwargs=None):
    """lm-eval's results for the folder (simple_evaluate's dict: "results" holds each task's metrics).
    `gen_kwargs`: lm-eval's --gen_kwargs string ("temperature=0,max_gen_toks=32"), for generation tasks."""
    check_model_folder(out_dir)  # before indexing lm-eval's tasks (~20 s): a broken folder fails at once
    check_model_files(out_dir)
    generation = parse_gen_kwargs(gen_kwargs)
    manager = check_tasks(tasks, include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from gpt_train.tokenizer import model_tokenizer

    with _offline_unless_the_hub_answers():
        try:  # lm-eval's own objects, loaded once: simple_evaluate runs them with the changes made here
            requested, loaded = _load_tasks(manager, tasks)  # the data from the cache when offline
        except (ConnectionError, OSError) as e:  # neither cached nor reachable
            raise UserError(f"lm-eval could not load a task's data ({first_line(e)}): run it once with network "
                            "so the datasets cache holds it, or use local tasks with --include_path") from None
        model_args = {}
        tokenizer = model_tokenizer(out_dir)
        if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:  # a char vocabulary
            generating = [name for name, task in loaded.items() if task.OUTPUT_TYPE == "generate_until"]
            if generating:
                raise UserError(f"{generating[0]} is a generation task, and {out_dir}'s char vocabulary has no "
                                "end-of-text token to stop at: score it with perplexity or multiple-choice tasks")
            model_args["prefix_token_id"] = tokenizer.get_vocab().get("\n", 0)  # a text starts after a newline
        model = HFLM(pretrained=out_dir, batch_size=batch_size, device=device, **model_args)
        generation = _fit_generation(loaded, generation, model.max_length, model.max_gen_toks)
        with _random_state_kept():
            return lm_eval.simple_evaluate(model=model, tasks=requested, task_manager=manager, limit=limit,
                                           gen_kwargs=generation or None, log_samples=False, verbosity="ERROR")


def parse_gen_kwargs(text):
    """lm-eval's --gen_kwargs ("temperature=0,max_gen_toks=32") as the dict its simple_evaluate takes."""
    if not text:
        return {}
    if any("=" not in pair for pair in text.split(",") if pair):
        raise UserError(f"--gen_kwargs={text}: give key=value pairs separated by commas, as lm-eval's --gen_kwargs "
                        "(temperature=0,max_gen_toks=32)")
    try:
        from lm_eval.utils import simple_parse_args_string  # deferred: an optional extra
    except ImportError:
        raise NotInstalled("lm-eval is not installed: pip install -r requirements-eval.txt") from None
    settings = simple_parse_args_string(text)
    for name, kind in NUMERIC_GEN_KWARGS.items():
        value = settings.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or value < 0):
            raise UserError(f"--gen_kwargs={text}: {name} must be a {'whole ' if kind is int else ''}number >= 0, "
                            f"got {value!r}")
    return settings


def _load_tasks(manager, names):
    """The tasks and groups asked for as lm-eval objects (a tag: its tasks), and every leaf task by name."""
    requested, leaves = [], {}
    for name in names:
        loaded = manager.load(name)
        requested += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
        leaves.update(loaded["tasks"])
    return requested, leaves


def _fit_generation(tasks, gen_kwargs, context, default_max_gen_toks):
    """lm-eval stops with an assertion (a traceback) where a generation task's max_gen_toks (--gen_kwargs',
    the task's own, else lm-eval's default of 256) is not below the model's context: those generate
    half the context, the prompt keeping the rest, said in one line. Returns the gen_kwargs to pass on."""
    cap, capped, most = context // 2, [], 0
    for name, task in tasks.items():
        if task.OUTPUT_TYPE != "generate_until":
            continue
        own = task.config.generation_kwargs or {}
        asked = int(gen_kwargs.get("max_gen_toks") or own.get("max_gen_toks") or default_max_gen_toks)
        if asked >= context:
            capped.append(name)
            most = max(most, asked)
            task.set_config("generation_kwargs", {**own, "max_gen_toks": cap})
    if not capped:
        return gen_kwargs
    print(f"note: {', '.join(capped)} would generate up to {most} tokens, past the model's context of {context}: "
          f"max_gen_toks={cap} there (half the context; the prompt keeps the rest)")
    return {**gen_kwargs, "max_gen_toks": cap} if "max_gen_toks" in gen_kwargs else gen_kwargs


class Judge:
    """lm_eval_tasks on a training run's checkpoints, or once on the model an eval_only run reads:
    built once in setup and called after each save, as the Hub pusher is. Unknown tasks are refused
    when it is built, before training; lm-eval missing is a warning, as the eval presets name tasks.
    Inactive (a no-op) without lm_eval_tasks."""

    def __init__(self, cfg, folder, report):
        """`folder`: what to judge, as the start decides it (gpt_train.start.Start.judged)."""
        self.cfg, self.folder = cfg, None
        if not cfg.lm_eval_tasks:
            return
        try:
            check_tasks(task_names(cfg.lm_eval_tasks), cfg.lm_eval_include_path)
        except NotInstalled as e:
            report(f"warning: lm_eval_tasks skipped: {e}")
            return
        if not folder:
            report("warning: lm_eval_tasks skipped: init_from='scratch' gives lm-eval no model folder to load")
        self.folder = folder

    def __call__(self, accelerator, iter_num, keep, ready=None):
        """The folder judged on the main process (the others wait at their next collective, up to
        ddp_timeout: keep lm_eval_limit small on long tasks), its scores logged like the losses.
        `ready()`: waits until the folder holds the checkpoint (a save in the background)."""
        if not self.folder:
            return
        if ready:
            ready()
        scores = accelerator.on_main_process(during_training)(self.cfg, self.folder, str(accelerator.device), keep)
        if scores:
            from gpt_train.metrics import log  # deferred, as the module's other heavy imports (see main)
            log(accelerator, "lm_eval", iter_num, scores)


def during_training(cfg, folder, device, keep=True):
    """cfg.lm_eval_tasks on a model folder, from a training run: lm-eval's table on the console,
    the scores kept with the model when `keep`, and flat for the trackers ({"lm_eval/task/metric": v}).
    A failing task is a warning and None: a benchmark never stops the training it watches. Writing
    the scores is ours, not lm-eval's: a failure there is the run's own (a full disk, say)."""
    from lm_eval.utils import make_table

    try:
        results = evaluate(folder, task_names(cfg.lm_eval_tasks), cfg.batch_size, device, cfg.lm_eval_limit or None,
                           cfg.lm_eval_include_path)
    except Exception as e:  # lm-eval's own errors are of every kind
        why = str(e) if isinstance(e, UserError) else first_line(e)
        print(f"warning: lm-eval on {folder} failed ({why}); the run goes on", file=sys.stderr)
        return None
    scores = save_results(folder, results)[0] if keep else scores_of(results)
    print(make_table(results))
    return {f"lm_eval/{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()}


def scores_of(results):
    """{task: {metric: value}} from lm-eval's results, without filters' suffixes and standard errors.
    Plain floats: some metrics come as numpy's, which YAML (the card's model-index) writes as a
    Python object that no YAML reader, the Hub's included, will load."""
    return {task: {k.split(",")[0]: float(v) for k, v in metrics.items()
                   if isinstance(v, float) and "_stderr" not in k}
            for task, metrics in results["results"].items()}


def save_results(out_dir, results):
    """OUT_DIR/eval_results.json, the model card's model-index and the Hub benchmarks' .eval_results/,
    each file written atomically; returns the scores and the .eval_results/ files written.

    eval_results.json keeps every task scored on these weights (the checkpoint's iteration): an
    evaluation of other tasks adds to it, one of the same task replaces it, except that a run on
    part of a benchmark (--limit) never replaces the whole benchmark's scores. Each task records
    its limit and the generation settings lm-eval used (a cap on max_gen_toks included)."""
    scores = scores_of(results)
    state = TrainerState.read_if_any(out_dir)  # None: a folder not trained by gpt-train
    iteration = state.iter_num if state else None
    limit = results.get("config", {}).get("limit")
    tasks = _kept_tasks(out_dir, iteration)
    kept = [task for task in scores if limit and task in tasks and not tasks[task]["limit"]]
    for task in kept:
        print(f"note: {task}'s scores on the whole benchmark stay in {EVAL_RESULTS}; these were on {limit} "
              "examples")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for task, metrics in scores.items():
        if task not in kept:
            tasks[task] = {"results": metrics, "limit": limit, "generation": _generation_of(results, task),
                           "date": date}
    write_json(os.path.join(out_dir, EVAL_RESULTS),
               {"iteration": iteration, "results": {task: entry["results"] for task, entry in tasks.items()},
                "tasks": {task: {k: v for k, v in entry.items() if k != "results"} for task, entry in tasks.items()}})
    card_path = os.path.join(out_dir, MODEL_CARD)
    if os.path.isfile(card_path):
        card = ModelCard.load(card_path)
        card.data.model_name = card.data.model_name or os.path.basename(os.path.abspath(out_dir))
        card.data.eval_results = [
            EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric,
                       metric_value=value, **_limited_source(entry["limit"]))
            for task, entry in tasks.items() for metric, value in entry["results"].items()]
        with atomic_path(card_path) as tmp:
            card.save(tmp)
        from gpt_train.checkpoint import refresh_manifest  # deferred: it imports transformers and peft
        refresh_manifest(out_dir, [MODEL_CARD])
    return scores, save_hub_results(out_dir, results, scores)


def _kept_tasks(out_dir, iteration):
    """{task: {results, limit, generation, date}} that eval_results.json holds for the weights at
    `iteration`; {} for other weights or none. A file of the earlier format (one evaluation) too."""
    try:
        with open(os.path.join(out_dir, EVAL_RESULTS), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or saved.get("iteration") != iteration or not isinstance(saved.get("results"), dict):
        return {}
    described = saved.get("tasks") or {}
    return {task: {"results": metrics, "limit": (described.get(task) or {}).get("limit", saved.get("limit")),
                   "generation": (described.get(task) or {}).get("generation", saved.get("gen_kwargs")),
                   "date": (described.get(task) or {}).get("date")}
            for task, metrics in saved["results"].items()}


def _generation_of(results, task):
    """The generation settings lm-eval ran a generation task with (its own, --gen_kwargs', the cap on
    max_gen_toks); None for other tasks."""
    config = results.get("configs", {}).get(task) or {}
    if config.get("output_type") != "generate_until":
        return None
    return config.get("generation_kwargs") or None


def hub_results(results, scores):
    """{task: EvalResultEntry} for the tasks whose data is a dataset on the Hub, as the Hub's
    .eval_results/ format reads them: the dataset, the task, its headline score, date and source."""
    entries = {}
    date = datetime.datetime.fromtimestamp(results.get("date") or datetime.datetime.now().timestamp(),
                                           datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        harness = f"lm-evaluation-harness {importlib.metadata.version('lm_eval')}"
    except importlib.metadata.PackageNotFoundError:  # results made elsewhere
        harness = "lm-evaluation-harness"
    for task, metrics in scores.items():
        config = results.get("configs", {}).get(task) or {}  # groups have none: their tasks are listed
        dataset = config.get("dataset_path")
        if not (metrics and isinstance(dataset, str) and HUB_DATASET_ID.fullmatch(dataset)
                and not os.path.exists(dataset)):  # datasets reads an existing folder before asking the Hub
            continue
        metric = next((m for m in HEADLINE_METRICS if m in metrics), next(iter(metrics)))
        shots = results.get("n-shot", {}).get(task, config.get("num_fewshot") or 0)
        revision = (config.get("dataset_kwargs") or {}).get("revision")
        entries[task] = EvalResultEntry(dataset_id=dataset, task_id=task, value=metrics[metric],
                                        dataset_revision=revision, date=date, source_url=LM_EVAL_URL,
                                        source_name=f"{harness} via gpt-train", notes=f"{metric}, {shots}-shot")
    return entries


def _limited_source(limit):
    """A card's score taken on part of a benchmark says so (the Hub wants a link with the name)."""
    if not limit:
        return {}
    return {"source_name": f"lm-eval on the first {limit} examples", "source_url": LM_EVAL_URL}


def save_hub_results(out_dir, results, scores):
    """OUT_DIR/.eval_results/<task>.yaml for each Hub benchmark scored, replacing that task's earlier
    file and keeping the other tasks' (a checkpoint of new weights drops them all:
    gpt_train.checkpoint); none for a run limited to part of each benchmark, which leaderboards
    would take for the whole. Returns the paths written, relative to out_dir."""
    entries = hub_results(results, scores)
    limit = results.get("config", {}).get("limit")
    if entries and limit:
        print(f"note: no {HUB_EVAL_RESULTS}/ for the Hub's leaderboards: scored on {limit} examples per task, not "
              "the whole benchmark")
        return []
    folder = os.path.join(out_dir, HUB_EVAL_RESULTS)
    if os.path.islink(folder):  # never write through a link: its target is not ours
        os.remove(folder)
    written = []
    for task, entry in entries.items():
        with atomic_path(os.path.join(folder, f"{task}.yaml")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(yaml_dump(eval_result_entries_to_yaml([entry]), sort_keys=False))
        written.append(f"{HUB_EVAL_RESULTS}/{task}.yaml")
    return written


@contextlib.contextmanager
def _offline_unless_the_hub_answers():
    """Without network, datasets retries each Hub dataset for minutes; with the Hub unreachable,
    datasets looks only in its cache, so a cached task runs and an uncached one fails at once."""
    import datasets.config  # deferred: importing datasets costs every training run ~0.7 s at start

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = saved or not _hub_answers()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _hub_answers():
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # any failure to reach it means: offline
        return False
    return True


@contextlib.contextmanager
def _random_state_kept():
    """lm-eval seeds Python's, numpy's and torch's generators (for reproducible few-shot
    examples); a training run's dropout and sampling must go on as if it had not run."""
    import torch

    states = random.getstate(), numpy.random.get_state()
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            yield
    finally:  # also when a task fails: the run goes on after a failed evaluation
        random.setstate(states[0])
        numpy.random.set_state(states[1])


@exit_on_user_error
def main(argv=None):
    parser = command_parser("python -m gpt_train.evaluate", "Runs lm-evaluation-harness tasks on a model folder.")
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), or name one")
    parser.add_argument("--limit", type=int, help="only the first N examples of each task (a quick look)")
    parser.add_argument("--include_path", help="a folder of your own task YAML files")
    parser.add_argument("--gen_kwargs", help="generation settings for generation tasks, as lm-eval's: "
                                             "'temperature=0,max_gen_toks=32'")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if is_url(args.out_dir):  # a store's run: judged in its cached copy, where the scores are kept
        url, args.out_dir = args.out_dir, model_folder(args.out_dir, "OUT_DIR")
        print(f"note: {url} is judged in its local copy {args.out_dir}; the store's run folder is left as it is")
    check_model_folder(args.out_dir)  # mistakes first: torch, transformers and lm-eval take seconds to import
    from lm_eval.utils import make_table

    from gpt_train.device import resolve_device
    device = str(resolve_device(args.device))
    with run_lock.hold(args.out_dir):  # it writes into the folder: never beside a training run
        results = evaluate(args.out_dir, task_names(args.tasks), args.batch_size, device, args.limit,
                           args.include_path, args.gen_kwargs)
        print(make_table(results))
        _, hub_files = save_results(args.out_dir, results)
    also = f", {', '.join(hub_files)}" if hub_files else ""
    print(f"wrote {os.path.join(args.out_dir, EVAL_RESULTS)}{also} and the model card's model-index")


if __name__ == "__main__":
    main()
