"""Scale-out settings: the Accelerate YAML files, the accumulation split, precision choice, bench.py."""
import datetime
import os

import pytest
import torch

from transformers import GPT2LMHeadModel

from conftest import ROOT, TINY_MODEL, read_metrics, run_script
from gpt_train.cli import load_config
from gpt_train.errors import UserError
from gpt_train.device import mixed_precision, process_group_kwargs, resolve_device, torch_dtype
from gpt_train.progress import gpu_peak_flops, peak_flops
from gpt_train.progress import format_mfu, mfu
from gpt_train.train import micro_steps_per_process, setup, train


def launch_env(name):
    """What `accelerate launch --config_file accelerate_configs/NAME.yaml` would run with."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    path = os.path.join(ROOT, "accelerate_configs", f"{name}.yaml")
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", path, "train.py"]))
    return args, prepare_multi_gpu_env(args) if args.num_processes > 1 else {}


@pytest.mark.parametrize("name, processes, machines, distributed", [
    ("8xa100", 8, 1, "MULTI_GPU"), ("fsdp_8xa100", 8, 1, "FSDP"), ("2x8xa100", 16, 2, "MULTI_GPU"),
    ("1gpu", 1, 1, "NO"), ("cpu", 1, 1, "NO"),
])
def test_accelerate_configs_load_with_accelerates_own_loader(name, processes, machines, distributed):
    from accelerate.commands.config.config_args import load_config_from_file
    config = load_config_from_file(os.path.join(ROOT, "accelerate_configs", f"{name}.yaml"))
    assert (config.num_processes, config.num_machines, config.distributed_type.value) == (processes, machines,
                                                                                          distributed)
    assert config.mixed_precision == ("no" if name == "cpu" else "bf16")
    args, _ = launch_env(name)
    assert args.num_processes == processes


def test_fsdp_config_shards_gpt2_blocks_with_fsdp2(monkeypatch):
    _, env = launch_env("fsdp_8xa100")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from accelerate.utils import FullyShardedDataParallelPlugin
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["GPT2Block"]
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and plugin.reshard_after_forward is True


def test_train_gpt2_on_8xa100_keeps_nanogpts_tokens_per_iteration():
    args, _ = launch_env("8xa100")
    cfg = load_config([os.path.join(ROOT, "configs", "train_gpt2.py")])
    micro = micro_steps_per_process(cfg.gradient_accumulation_steps, args.num_processes)
    assert micro == 5
    assert micro * args.num_processes * cfg.batch_size * cfg.block_size == 491_520


def test_two_nodes_need_a_divisible_accumulation_count():
    args, _ = launch_env("2x8xa100")
    with pytest.raises(UserError, match="not divisible by the 16 processes: use a multiple of 16"):
        micro_steps_per_process(40, args.num_processes)
    assert micro_steps_per_process(32, args.num_processes) * 16 * 15 * 1024 == 491_520  # the README's recipe
    with pytest.raises(UserError) as refused:  # raised before Accelerator() is built: no launcher needed to see it
        micro_steps_per_process(3, 2)
    assert str(refused.value) == ("gradient_accumulation_steps=3 is not divisible by the 2 processes: use a "
                                  "multiple of 2")


def test_explicit_dtype_beats_the_launch_config_and_auto_defers_to_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert mixed_precision(load_config([]).dtype, cpu) == "no"  # auto on CPU: float32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert mixed_precision(load_config([]).dtype, cpu) is None  # auto: the YAML decides
    assert mixed_precision(load_config(["--dtype=float32"]).dtype, cpu) == "no"
    assert mixed_precision(load_config(["--bf16=True"]).dtype, cpu) == "bf16"
    with pytest.raises(UserError, match="float16' is not supported on CPU"):
        mixed_precision(load_config(["--dtype=float16"]).dtype, cpu)


def test_training_and_sampling_share_one_device_and_precision_policy(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") and torch_dtype("auto", torch.device("cpu")) == torch.float32
    assert process_group_kwargs("cpu", "nccl", 1800) == {"cpu": True}
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched: ddp_timeout reaches the process group
    assert process_group_kwargs("cpu", "nccl", 60) == {"cpu": True, "timeout": datetime.timedelta(seconds=60)}
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device='cuda:1' but no CUDA GPU is visible"):
            resolve_device("cuda:1")  # sampling names a GPU
    with pytest.raises(UserError, match="choose the GPU with CUDA_VISIBLE_DEVICES=1 and --device=cuda"):
        process_group_kwargs("cuda:1", "nccl", 1800)  # training takes its GPUs from the launcher
    with pytest.raises(UserError, match="device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"):
        resolve_device("tpu")


@pytest.mark.slow
def test_compiled_training_matches_eager_in_one_graph_and_publishes_loadable_weights(char_data, tmp_path):
    """compile=True is the default on GPUs; inductor compiles for CPU too, so its path is checked here."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    common = [f"--data_dir={char_data}", *TINY_MODEL, "--gradient_accumulation_steps=2", "--max_iters=6",
              "--eval_interval=3", "--eval_iters=2"]
    train(load_config([*common, f"--out_dir={tmp_path / 'compiled'}", "--compile=True"]))
    assert not counters["graph_break"], counters["graph_break"]  # a break splits the step: slow on GPUs
    assert counters["stats"]["unique_graphs"] == 2  # training, and evaluation under no_grad
    train(load_config([*common, f"--out_dir={tmp_path / 'eager'}"]))
    for event, key in (("train", "train/step_loss"), ("eval", "val/loss")):
        for a, b in zip(read_metrics(tmp_path / "compiled", event), read_metrics(tmp_path / "eager", event),
                        strict=True):
            assert abs(a[key] - b[key]) < 1e-4, (event, a, b)
    # the published folder holds transformers' names, not torch.compile's `_orig_mod.` ones
    model, info = GPT2LMHeadModel.from_pretrained(tmp_path / "compiled", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # and resume reads its weights from there: the resumed run starts where the compiled one ended
    ended = read_metrics(tmp_path / "compiled", "eval")
    train(load_config([*common, f"--out_dir={tmp_path / 'compiled'}", "--init_from=resume", "--max_iters=7"]))
    evals = read_metrics(tmp_path / "compiled", "eval")
    assert [e["iter"] for e in evals] == [0, 3, 6, 7] and evals[2]["val/loss"] == ended[2]["val/loss"]


def test_compiled_training_attends_through_is_causal_without_a_mask_tensor(char_data, tmp_path):
    """Given a mask tensor SDPA cannot pick flash attention; transformers builds one when compiling."""
    run = setup(load_config([f"--data_dir={char_data}", *TINY_MODEL, f"--out_dir={tmp_path}"]))
    graphs = []
    compiled = torch.compile(run.model, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    x, y = run.sampler.batch("train", run.sampler.iteration_offsets("train", 0, 1)[0])
    eager_loss = run.model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
    assert torch.allclose(compiled(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss, eager_loss)
    sdpa = [n for gm in graphs for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.nn.functional.scaled_dot_product_attention]
    assert len(sdpa) == 2  # one per layer
    for node in sdpa:
        assert node.kwargs.get("attn_mask") is None and node.kwargs.get("is_causal") is True, node.kwargs


@pytest.mark.slow
def test_a_benchmark_saves_pushes_and_logs_to_wandb_nothing(char_data, tmp_path):
    """train_gpt2 says always_save_checkpoint=True and wandb_log=True: bench.py of it must not act on them."""
    result = run_script("bench.py", "configs/train_gpt2.py", f"--data_dir={char_data}", "--device=cpu",
                        "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16",
                        "--batch_size=2", "--gradient_accumulation_steps=1", "--bench_iters=2", "--bench_warmup=1",
                        "--push_to_hub=True", "--hub_model_id=someone/bench", env={"HF_TOKEN": ""})
    assert "saving checkpoint" not in result.stdout and "sample from it" not in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("cpu x1: ")


@pytest.mark.slow
def test_bench_runs_the_compiled_loop_on_cpu_and_prints_its_figures(char_data, tmp_path):
    result = run_script("bench.py", f"--data_dir={char_data}", "--device=cpu", "--compile=True", "--n_layer=2",
                        "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--bench_iters=5",
                        "--bench_warmup=2", "--profile=True", f"--trace_file={tmp_path / 'trace.json'}")
    lines = result.stdout.strip().splitlines()
    assert "torch.compile: 2 graph(s) (training, evaluation), 0 graph break(s)" in lines
    summary = lines[-2]
    assert summary.startswith("cpu x1: ") and "ms/iter (median of 5)" in summary
    assert "tokens/s, MFU n/a, peak memory" in summary  # a CPU's peak is not known
    assert os.path.getsize(tmp_path / "trace.json") > 1000


@pytest.mark.parametrize("name, capability, tflops", [
    ("NVIDIA H100 80GB HBM3", (9, 0), 989), ("NVIDIA H100 PCIe", (9, 0), 756), ("NVIDIA H100 NVL", (9, 0), 835),
    ("NVIDIA H200", (9, 0), 989), ("NVIDIA H200 NVL", (9, 0), 835), ("NVIDIA GH200 480GB", (9, 0), 989),
    ("NVIDIA A100-SXM4-80GB", (8, 0), 312), ("NVIDIA A100 80GB PCIe", (8, 0), 312), ("NVIDIA L4", (8, 9), 121),
    ("NVIDIA L40S", (8, 9), 362), ("NVIDIA GeForce RTX 4090", (8, 9), 165), ("NVIDIA GeForce RTX 5090", (12, 0), 209.5),
    ("NVIDIA B200", (10, 0), 2250),
    ("NVIDIA L40", (8, 9), None), ("NVIDIA GeForce RTX 3090", (8, 6), None), ("Tesla V100-SXM2-16GB", (7, 0), None),
    ("NVIDIA H100 80GB HBM3", (8, 0), None),  # a name with another architecture's capability is not guessed at
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", (9, 0), None), ("NVIDIA GeForce RTX 4090 Laptop GPU", (8, 9), None),
])
def test_peak_flops_by_name_and_compute_capability(name, capability, tflops):
    assert gpu_peak_flops(name, capability) == (tflops * 1e12 if tflops else None)


def test_no_peak_and_so_no_mfu_on_a_cpu():
    assert peak_flops(torch.device("cpu")) is None
    assert format_mfu(mfu(1e12, None)) == "n/a" and format_mfu(mfu(1e12, 4e12)) == "25.00%"
