"""Ray Train: gpt-train's own loop in each worker of a `TorchTrainer`, Accelerate inside (Ray's
documented Accelerate pattern, without `prepare_model`), restarted by Ray when a worker dies.

    python -m gpt_train.ray_train --num-workers=8 --use-gpu --max-failures=3 \\
        --storage-path=/shared/ray configs/train_gpt2.py --out_dir=/shared/runs/gpt2

Launcher flags are dashed (as torchrun's are); everything else goes to train.py unchanged. Ray sets
up the process group and the environment Accelerate reads, so each worker runs the same
`train(cfg)` as `python train.py`. A worker that dies (a lost node, a spot instance taken back)
ends the attempt; Ray starts the group again (`FailureConfig(max_failures)`) and every start
continues from out_dir's last checkpoint (`resume_from_checkpoint=True` is added). out_dir must be
one folder every worker sees: a shared filesystem, or an object-store URL on one node
(docs/out-dir.md); Ray's own storage_path keeps Ray's records of the run, not its checkpoints.

Not here: the loop (gpt_train.train); the settings (gpt_train.config).
"""
import argparse
import os
import sys

from gpt_train.cli import load_config
from gpt_train.errors import UserError, exit_on_user_error


def worker(config):
    """What each Ray worker runs: the settings as train.py would read them, then the loop."""
    from gpt_train.train import train

    # relative paths as the user gave them (Ray starts workers elsewhere); on a node without the
    # launcher's folder they are Ray's working directory's: give absolute, shared paths there
    if os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    try:
        train(load_config(config["argv"]))
    except UserError as e:  # a setting or a folder to fix: its one line, not the loop's frames
        raise e.with_traceback(None) from None


def parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m gpt_train.ray_train", allow_abbrev=False,
        description="Train under Ray Train: dashed flags are Ray's, the rest are train.py's (presets, --key=value).")
    parser.add_argument("--num-workers", type=int, default=1, help="training processes (one per GPU with --use-gpu)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs Ray reserves per worker")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="worker-group restarts before the run fails (-1: without limit)")
    parser.add_argument("--storage-path", default=None,
                        help="where Ray keeps its records of the run (a shared folder or s3://...; default ~/ray_results)")
    parser.add_argument("--name", default="gpt-train", help="the run's name under storage-path")
    ours, rest = parser.parse_known_args(argv)
    dashed = [arg for arg in rest if arg.startswith("--") and "-" in arg[2:].split("=")[0]]  # settings have _
    if dashed:
        raise UserError(f"unknown launcher flag {dashed[0].split('=')[0]} (python -m gpt_train.ray_train --help); "
                        "train.py's settings are --key=value")
    if ours.num_workers < 1:
        raise UserError(f"--num-workers={ours.num_workers}: give 1 or more")
    if not any(arg.startswith("--resume_from_checkpoint") for arg in rest):
        rest = [*rest, "--resume_from_checkpoint=True"]  # each start Ray makes continues the last checkpoint
    return ours, rest


def trainer(ours, argv):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        worker, train_loop_config={"argv": argv, "cwd": os.getcwd()},
        scaling_config=ScalingConfig(num_workers=ours.num_workers, use_gpu=ours.use_gpu,
                                     resources_per_worker={"CPU": ours.cpus_per_worker}),
        run_config=RunConfig(name=ours.name, storage_path=ours.storage_path,
                             failure_config=FailureConfig(max_failures=ours.max_failures)))


@exit_on_user_error
def main(argv=None):
    ours, argv = parse(sys.argv[1:] if argv is None else argv)
    cfg = load_config(argv)  # a mistyped setting is one line here, before Ray starts anything
    try:
        import ray
        from ray.train import TrainingFailedError
    except ImportError as e:
        raise UserError(f"Ray Train is not installed ({e}): pip install 'ray[train]==2.60.0'") from None
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # Ray's copy of each print doubled every line
    if not os.environ.get("RAY_ADDRESS"):  # Ray on this machine, which never grows: what is asked must fit now
        ray.init()
        short = shortfall(ours, ray.cluster_resources())
        if short:
            ray.shutdown()
            raise UserError(f"{short}: lower --num-workers{' or drop --use-gpu' if ours.use_gpu else ''}, or "
                            "set RAY_ADDRESS to a cluster that has them")
    try:
        result = trainer(ours, argv).fit()
    except TrainingFailedError as e:
        ray.shutdown()  # Ray's logs of the failure first: the one line is the last
        raise UserError(_why(e)) from None
    print(f"Ray Train's run ended: the model is in {cfg.out_dir}")
    return result


def shortfall(ours, resources):
    """What the workers ask for and `resources` (a Ray cluster's) lack, in words; None if they fit
    (else Ray waits for them without end)."""
    needed = {"GPU": ours.num_workers if ours.use_gpu else 0, "CPU": ours.num_workers * ours.cpus_per_worker}
    for kind, amount in needed.items():
        if amount > resources.get(kind, 0):
            return (f"--num-workers={ours.num_workers} asks for {amount:g} {kind}s and this machine's Ray has "
                    f"{resources.get(kind, 0):g}")
    return None


def _why(error):
    """The run's failure in one line: a worker's own one-line error (a missing dataset, a bad
    setting) as train.py says it, else what Ray says."""
    failures = getattr(error, "worker_failures", {}) or {}
    for _, failure in sorted(failures.items()):
        mine = failure if isinstance(failure, UserError) else getattr(failure, "cause", None)
        if isinstance(mine, UserError):
            return str(mine)
    first = str(error).strip().splitlines()
    return f"Ray Train stopped the run after its restarts: {first[0] if first else type(error).__name__}"


if __name__ == "__main__":
    main()
