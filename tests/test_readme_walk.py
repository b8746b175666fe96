"""The README's and docs/'s commands, run as a new user runs them: in a fresh copy of the
repository, in order (the README, then each docs page), exactly as written, with settings
appended only to make training runs short. The commands on your own data (my_corpus.txt and the
like) and the chat chain share no file with the others and run beside them.

Every command of the README and of docs/ is listed in PLAN with what it needs here: the settings
appended, or why it cannot run on a CPU machine without network. A command added to them and
not to PLAN fails the test, so the documentation cannot grow commands nobody ran.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ACCELERATE, ROOT, free_port
from gpt_train.checkpoint import RUN_CONFIG

pytestmark = pytest.mark.slow  # launched processes or lm-eval's task index: the full suite only

DOCUMENTS = ["README.md", *sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")))]
SHORT_TRAINING = ["--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10", "--eval_iters=2"]
SHORT_SAMPLING = ["--max_new_tokens=20"]
NO_COMPILE = ["--compile=False"]  # the GPU presets compile; on a CPU that costs ~30 s a run


class Skip(str):
    """Why a command does not run here."""


PLAN = {
    # README.md
    "pip install -r requirements.txt": Skip("installs the environment these tests run in"),
    "python data_prep/shakespeare_char/prepare.py": [],
    "python train.py configs/train_shakespeare_char_cpu.py --resume_from_checkpoint=True": SHORT_TRAINING,
    "python sample.py --out_dir=out-shakespeare-char": SHORT_SAMPLING,
    "pip install -r requirements-dev.txt": Skip("installs the environment these tests run in"),
    "python -m pytest -q": Skip("this test suite"),
    "python data_prep/openwebtext/prepare.py --num_proc=16": Skip("downloads OpenWebText (54 GB)"),
    "accelerate launch --config_file accelerate_configs/8xa100.yaml train.py configs/train_gpt2.py "
    "--wandb_run_name=gpt2-124M-short --max_iters=100000 --lr_decay_iters=100000": Skip("needs 8 GPUs"),
    "python sample.py --out_dir=out-shakespeare-char --num_samples=3 --max_new_tokens=200": [],
    "python -c \"from transformers import pipeline; print(pipeline('text-generation', model='out-shakespeare-char')"
    "('ROMEO:', max_length=56))\"": [],
    "python data_prep/custom/prepare.py --source=my_corpus.txt --name=mine": [],
    "python train.py configs/finetune_shakespeare.py --dataset=mine --init_from=gpt2 --out_dir=out-mine":
        ["--max_iters=2", "--gradient_accumulation_steps=2", "--eval_iters=2", *NO_COMPILE],
    'python sample.py --out_dir=out-mine --start="Once upon a time"': SHORT_SAMPLING,
    "python train.py configs/eval_gpt2.py": ["--eval_iters=2", *NO_COMPILE],
    "python -m gpt_train.evaluate out-shakespeare-char --tasks=shakespeare_val --include_path=lm_eval_tasks": [],
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train.py "
    "configs/train_shakespeare_char_cpu.py --gradient_accumulation_steps=2 --batch_size=6 --out_dir=out-ddp":
        SHORT_TRAINING,
    "python train.py configs/train_shakespeare_char_cpu.py --out_dir=out-logged --report_to=tensorboard "
    "--max_iters=200": SHORT_TRAINING,
    "python -m gpt_train.convert to-gguf out-shakespeare-char": [],
    "python train.py --help": [],
    "python train.py configs/train_shakespeare_char_cpu.py --max_iters=1000 --out_dir=out-my-run --print_config > "
    "my_run.py": [],
    "python train.py my_run.py": ["--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--batch_size=8",
                                  *NO_COMPILE],  # a few small steps
    "pip install -e .": Skip("console commands are run through their pyproject.toml entry points instead"),
    "gpt-prepare shakespeare_char": [],
    "gpt-train configs/train_shakespeare_char_cpu.py --out_dir=out-installed": SHORT_TRAINING,
    "gpt-sample --out_dir=out-installed": SHORT_SAMPLING,
    "gpt-bench configs/train_shakespeare_char_cpu.py --bench_iters=20": ["--bench_warmup=2"],
    # docs/gpu.md
    "NANOGPT=path/to/nanoGPT bash benchmarks/gpu_carry.sh": Skip("fetches nanoGPT and wheels for a GPU session; "
                                                                 "tests/test_gpu_checks.py runs what they feed"),
    "bash benchmarks/gpu_checks.sh": Skip("a GPU session's checks; tests/test_gpu_checks.py smoke-runs each on CPU"),
    # docs/benchmarks.md
    "python bench.py configs/train_shakespeare_char_cpu.py --bench_iters=50": ["--bench_warmup=2"],
    "python bench.py configs/train_gpt2.py --dataset=openwebtext": Skip("needs OpenWebText (54 GB) and a GPU"),
    # docs/clients.md
    "python -m gpt_train.convert upgrade out-shakespeare-char": [],
    "lm_eval --model hf --model_args pretrained=out-bpe --tasks hellaswag --device cpu":
        Skip("a BPE model of your own, and HellaSwag from the Hub"),
    "lm_eval --model hf --model_args pretrained=out-shakespeare-char,prefix_token_id=0 --include_path lm_eval_tasks "
    "--tasks shakespeare_val": ["--limit", "20"],
    "python -m gpt_train.evaluate out-gpt2 --tasks=hellaswag,arc_easy,piqa,lambada_openai --batch_size=16":
        Skip("a GPT-2 folder of your own, and its tasks' data from the Hub"),
    "gpt-eval out-bpe --tasks=my_generation --include_path=my_tasks --gen_kwargs=temperature=0,max_gen_toks=32":
        Skip("a BPE model and a generation task of your own (tests/test_lm_eval.py runs one)"),
    "python -m gpt_train.convert to-gguf out-bpe model.gguf --outtype=q8_0":
        Skip("a BPE model of your own (tests/test_gguf.py converts one)"),
    "python -m gpt_train.convert to-gguf out-bpe model.gguf --force":
        Skip("a BPE model of your own (tests/test_gguf.py replaces a file with --force)"),
    # docs/configuration.md
    "python train.py configs/train_shakespeare_char.py --per_device_train_batch_size=32 --max_steps=2000":
        ["--print_config"],  # a GPU run, its 2000 steps spelled --max_steps: resolved only
    # docs/data.md
    "python train.py configs/train_gpt2.py --stream_from=HuggingFaceFW/fineweb-edu --stream_subset=sample-10BT":
        Skip("streams FineWeb-Edu from the Hub (tests/test_stream.py streams local files)"),
    "python train.py configs/train_gpt2.py --stream_from='/data/fineweb/*.parquet'":
        Skip("FineWeb's parquet files on your disk (tests/test_stream.py streams files it writes)"),
    "python data_prep/custom/prepare.py --source=my_book.txt": [],
    "python data_prep/custom/prepare.py --source='logs/*.jsonl' --text_column=body --name=logs": [],
    "python data_prep/custom/prepare.py --source=notes.parquet --tokenizer=char --val_fraction=0.05": [],
    "python data_prep/custom/prepare.py --source='wiki_fr/*.txt' --tokenizer=bpe --vocab_size=8192": [],
    "python data_prep/custom/prepare.py --source=roneneldan/TinyStories --val_fraction=0.01":
        Skip("downloads TinyStories from the Hub"),
    "python train.py --dataset=my_book --init_from=gpt2 ...": Skip("a sketch: '...' stands for your settings"),
    # docs/evaluation.md
    "python train.py configs/train_gpt2.py --lm_eval_tasks=hellaswag --lm_eval_limit=1000":
        Skip("needs OpenWebText, a GPU and HellaSwag from the Hub"),
    # docs/fine-tuning.md
    "python train.py configs/finetune_shakespeare_lora.py":
        Skip("gpt2-xl from the Hub (tests/test_lora.py runs this preset on a cached stand-in)"),
    "python data_prep/chat/prepare.py --source=data_prep/chat/tiny_chats.jsonl --tokenizer_from=gpt2": [],
    "python train.py configs/finetune_chat.py": ["--max_iters=4", "--eval_interval=2", "--eval_iters=2",
                                                 "--block_size=64"],  # the stand-in gpt2's context
    'echo "What is 7 plus 5?" | python sample.py --out_dir=out-chat --chat': SHORT_SAMPLING,
    # docs/hub.md
    "hf auth login": Skip("the Hub (tests/test_hub.py pushes to a stand-in)"),
    "python train.py configs/train_shakespeare_char.py --push_to_hub=True --hub_model_id=you/shakespeare-char":
        Skip("the Hub"),
    "python -m gpt_train.push out-shakespeare-char you/shakespeare-char [--private]": Skip("the Hub"),
    # docs/logging.md
    "python -m gpt_train.plot out-shakespeare-char": [],
    "python -m gpt_train.plot out-a out-b out-c --output=compare.png": Skip("three runs of your own"),
    "python -m gpt_train.plot out-char out-bpe --bits_per_byte": Skip("a char and a BPE run of your own"),
    "python train.py configs/train_shakespeare_char_cpu.py --out_dir=out-logged --report_to=tensorboard,trackio":
        Skip("the README's TensorBoard run already holds out-logged (tests/test_trackers.py runs both)"),
    "tensorboard --logdir out-logged/runs": Skip("a server"),
    "trackio show --project shakespeare-char": Skip("a server"),
    "WANDB_MODE=offline python train.py configs/train_shakespeare_char_cpu.py --out_dir=out-wandb --wandb_log=True":
        SHORT_TRAINING,
    "wandb sync wandb/offline-run-*": Skip("uploads to wandb's servers"),
    # docs/nanogpt.md
    "python -m gpt_train.convert from-nanogpt ../nanoGPT/out-shakespeare-char/ckpt.pt hf-shakespeare-char "
    "--meta=data/shakespeare_char": Skip("a nanoGPT checkpoint (tests/test_convert.py converts one it makes)"),
    "python -m gpt_train.convert to-nanogpt hf-shakespeare-char ../nanoGPT/out-converted/ckpt.pt":
        Skip("follows from-nanogpt (tests/test_convert.py runs both ways)"),
    # docs/sampling.md
    'python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200': [],
    "python sample.py --init_from=gpt2-xl --start=FILE:prompt.txt --top_p=0.9": SHORT_SAMPLING,
    # docs/out-dir.md
    "export AWS_PROFILE=...": Skip("credentials of your own"),
    "python train.py configs/train_gpt2.py --out_dir=s3://my-bucket/runs/gpt2 --resume_from_checkpoint=True":
        Skip("a bucket of your own (tests/test_store.py trains on S3's API served on loopback)"),
    "python sample.py --out_dir=s3://my-bucket/runs/gpt2": Skip("follows the run above (tests/test_store.py samples "
                                                                "from its bucket)"),
    # docs/scaling.md
    "sbatch --gpus-per-node=8 --cpus-per-task=64 accelerate_configs/slurm_requeue.sh configs/train_gpt2.py":
        Skip("a SLURM cluster with GPUs (tests/test_slurm.py submits the script to a one-host SLURM on CPUs)"),
    "torchrun --standalone --nproc_per_node=8 train.py configs/train_gpt2.py":
        Skip("needs 8 GPUs (tests/test_restarts.py runs plain torchrun on two CPU processes)"),
    "torchrun --nnodes=1:2 --nproc_per_node=8 --max-restarts=3 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 "
    "--rdzv-id=gpt2 train.py configs/train_gpt2.py --resume_from_checkpoint=True":
        Skip("needs 8 GPUs (tests/test_restarts.py restarts a killed worker under torchrun's elastic agent on CPUs)"),
    "accelerate launch --config_file accelerate_configs/8xa100.yaml train.py configs/train_gpt2.py":
        Skip("needs 8 GPUs"),
    "pip install 'ray[train]==2.60.0'": Skip("requirements-dev.txt installs it for these tests"),
    "python -m gpt_train.ray_train --num-workers=8 --use-gpu --max-failures=3 --storage-path=/shared/ray "
    "configs/train_gpt2.py --out_dir=/shared/runs/gpt2":
        Skip("needs 8 GPUs (tests/test_ray.py runs it as written on a CPU machine: one line, no wait; and two "
             "local Ray workers on CPUs, one killed)"),
    "accelerate launch --config_file accelerate_configs/2x8xa100.yaml --machine_rank 0 --main_process_ip 10.0.0.1 "
    "train.py configs/train_gpt2.py --gradient_accumulation_steps=32 --batch_size=15": Skip("needs two 8-GPU nodes"),
    "accelerate launch --config_file accelerate_configs/8xa100.yaml --max_restarts=3 train.py configs/train_gpt2.py":
        Skip("needs 8 GPUs (tests/test_restarts.py runs the restart on two CPU processes)"),
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 accelerate launch --config_file accelerate_configs/2x8xa100.yaml "
    "--main_process_ip 10.0.0.1 --rdzv_backend c10d --max_restarts=3 train.py configs/train_gpt2.py "
    "--gradient_accumulation_steps=32 --batch_size=15": Skip("needs two 8-GPU nodes"),
    # docs/time-to-target.md
    "python train.py configs/speedrun_shakespeare_char_cpu.py": ["--max_iters=20", "--eval_iters=2"],
}


def documented_commands():
    """Each shell command of the README's and docs/'s code blocks, in order ('\\' continuations joined)."""
    commands = []
    for name in DOCUMENTS:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text = f.read()
        for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    commands += [" ".join(c.split()) for c in re.split(r"\s*&&\s*", line)]
    return commands


def test_every_documented_command_is_planned():
    commands = documented_commands()
    assert set(commands) == set(PLAN), (set(commands) ^ set(PLAN))


@pytest.fixture
def fresh_clone(tmp_path, tiny_gpt2):
    """The repository's files in a new folder, as `git clone` gives them (new files not yet ignored
    count as committed), plus what the README expects the user to bring: my_corpus.txt, and (no
    network here) gpt2 in the HF cache."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "gpt-train"
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(clone / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), clone / name)
    with open(clone / "data_prep" / "tinyshakespeare" / "input.txt", encoding="utf-8") as f:
        text = f.read()
    (clone / "my_corpus.txt").write_text(text[:200_000])
    # the files the docs' own-data examples name
    (clone / "my_book.txt").write_text(text[200_000:400_000])
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    (clone / "logs").mkdir()
    for i in range(2):
        (clone / "logs" / f"day{i}.jsonl").write_text("".join(json.dumps({"body": p}) + "\n" for p in paragraphs[i::2]))
    pq.write_table(pa.table({"text": paragraphs[:3000]}), clone / "notes.parquet")
    (clone / "wiki_fr").mkdir()
    for i in range(2):
        (clone / "wiki_fr" / f"page{i}.txt").write_text("\n\n".join(paragraphs[i * 1000:(i + 1) * 1000]))
    (clone / "prompt.txt").write_text("ROMEO:")
    for name in ("gpt2", "gpt2-xl"):  # stand-ins in the HF cache: no network here
        snapshot = tmp_path / "hub" / f"models--openai-community--{name}"
        shutil.copytree(tiny_gpt2, snapshot / "snapshots" / "0123abc")
        (snapshot / "refs").mkdir()
        (snapshot / "refs" / "main").write_text("0123abc")
    return clone


def console_script(name):
    """What pip's generated `name` script runs: the pyproject.toml entry point, its value to sys.exit."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        module, _, function = tomllib.load(f)["project"]["scripts"][name].partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function} as main; sys.exit(main())"]


def run(command, clone, env):
    """The command as a shell would run it: VAR=value prefixes, `echo TEXT | ...`, `> FILE`; the plan's
    settings go before any redirection."""
    stdin, rest = None, command
    if rest.startswith("echo ") and " | " in rest:
        echo, rest = rest.split(" | ", 1)
        stdin = shlex.split(echo)[1] + "\n"
    words = shlex.split(rest)
    output = None
    if ">" in words:
        words, output = words[:words.index(">")], words[words.index(">") + 1]
    words += PLAN[command]
    extra_env = {}
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        extra_env[key] = value
    if words[0] == "python":
        words[0] = sys.executable
    elif words[0] == "accelerate":
        words[0:2] = [ACCELERATE, "launch", "--main_process_port", free_port()]
    elif words[0].startswith("gpt-"):
        words[0:1] = console_script(words[0])
    elif words[0] == "lm_eval":
        words[0] = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    result = subprocess.run(words, cwd=clone, env={**env, **extra_env}, capture_output=True, text=True, timeout=600,
                            input=stdin)
    if output:
        (clone / output).write_text(result.stdout)
    return result


def own_data(command):
    """Whether a command belongs to the "your own data" chain: it shares no file with the others."""
    return any(name in command for name in ("mine", "my_corpus", "eval_gpt2.py", "my_book", "logs/", "notes.parquet",
                                            "wiki_fr", "chat", "gpt2-xl"))


def test_the_readme_walk(fresh_clone, tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
           "OMP_NUM_THREADS": "1"}
    commands = list(dict.fromkeys(c for c in documented_commands() if not isinstance(PLAN[c], Skip)))
    # the CPU laptop pattern repeats the quick start's commands: they run once. The two chains
    # share no file, so they run side by side (one thread each, on the 2-core machine), each in
    # README order.
    failures = []
    beside = threading.Thread(target=walk, args=([c for c in commands if own_data(c)], fresh_clone, env, failures))
    beside.start()
    walk([c for c in commands if not own_data(c)], fresh_clone, env, failures)
    beside.join()
    assert not failures, failures[0]


def walk(commands, clone, env, failures):
    try:
        for command in commands:
            if command == "python train.py configs/eval_gpt2.py":
                # its data is OpenWebText (54 GB): a stand-in encoded the same way, with GPT-2 BPE (the walk's own)
                shutil.copytree(clone / "data" / "mine", clone / "data" / "openwebtext")
            result = run(command, clone, env)
            assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stdout,
                                                                                 result.stderr)
            check_output(command, result, clone)
    except AssertionError as e:
        failures.append(e)


def check_output(command, result, clone):
    """What each command must have done, beyond exiting 0 without a traceback."""
    trains = "--print_config" not in command  # the --print_config example only writes my_run.py
    if command.startswith(("python train.py configs/train_shakespeare_char_cpu.py", "gpt-train")) and trains:
        assert "best val loss" in result.stdout and (clone / "out-shakespeare-char" / "model.safetensors").is_file()
        assert "Run(" not in result.stdout  # a console script printed the returned run
    if "sample" in command:
        assert len(result.stdout.strip()) > 20, result.stdout
    if "--num_processes 2" in command:  # one run on two processes, not two runs side by side
        assert result.stdout.count("2 process(es) on cpu") == 1 and "1 process(es)" not in result.stdout
        assert result.stdout.count("best val loss") == 1
    if command == "python train.py configs/eval_gpt2.py":
        assert "perplexity: train" in result.stdout
        # the preset's lm-eval tasks: Hub datasets, not cached on this offline machine
        assert "warning: lm-eval on " in result.stderr and "could not load a task's data" in result.stderr
        assert not (clone / "out").exists()  # an evaluation writes nothing
    if command.startswith("gpt-bench"):
        assert "ms/iter (median of 20)" in result.stdout
    if command.startswith("gpt-train"):  # its own folder, beside the quick start's
        with open(clone / "out-installed" / "metrics.jsonl", encoding="utf-8") as f:
            evals = [line for line in f if '"event": "eval"' in line]
        assert len(evals) == 3  # iterations 0, 10, 20
        assert (clone / "out-installed" / RUN_CONFIG).is_file()
    if "--print_config > my_run.py" in command:
        assert "max_iters = 1000" in (clone / "my_run.py").read_text()
    if "shakespeare_val" in command:
        assert "bits_per_byte" in result.stdout and "Warning" not in result.stderr, result.stderr[-2000:]
    if "--report_to=tensorboard" in command:
        assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(clone / "out-logged" / "runs")
                   for name in files)
    if command.startswith("echo"):  # a chat turn answered
        assert result.stdout.strip(), result.stderr[-2000:]
