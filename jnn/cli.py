"""The `jnn` command: `jnn train`, `jnn eval RUN_DIR`, `jnn export RUN_DIR`, `jnn predict RUN_DIR INPUTS`,
`jnn info`, `jnn presets`, `jnn models`, `jnn bench`.

  jnn train                                   # digits CNN on scikit-learn's bundled digits
  jnn train --preset mlp_mnist --data-dir ~/data/mnist --set optim.learning_rate=3e-4
  jnn train --preset resnet20_cifar10 --debug # the tiny variant, seconds on a CPU
  jnn train --resume runs/digits-20261122-101500
  jnn eval runs/digits-20261122-101500
  jnn export runs/digits-20261122-101500 --format onnx       # runs/.../model.onnx
  jnn predict runs/digits-20261122-101500 images/ --output predictions.npz
  jnn bench --quick                           # the benchmark harness of a source checkout
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from jnn import _collector


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the arguments every training entry point shares: --debug, --data-dir, --run-dir, --set.

    Example scripts use it too, so `python examples/X.py` and `jnn train --preset X` read alike.
    """
    parser.add_argument("--debug", action="store_true", help="the preset's tiny variant (a few steps)")
    parser.add_argument("--data-dir", default=None, help="directory (or file) with the preset's data")
    parser.add_argument("--run-dir", default=None, help="where to write the run (default: runs/<preset>-<time>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. optim.learning_rate=3e-4 (repeatable)")
    return parser


def add_demo_arguments(parser: argparse.ArgumentParser, steps: int) -> argparse.ArgumentParser:
    """Adds --debug, --steps and --seed: the flags of the examples that compare variants on the digits."""
    parser.add_argument("--debug", action="store_true", help="a few steps per variant: the code path only")
    parser.add_argument("--steps", type=int, default=steps, help="training steps per variant")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def default_run_dir(name: str, debug: bool = False) -> str:
    """`runs/<name>[-debug]-<YYYYmmdd-HHMMSS>`."""
    return os.path.join("runs", f"{name}{'-debug' if debug else ''}-{time.strftime('%Y%m%d-%H%M%S')}")


def config_from_args(name: str, args: argparse.Namespace):
    """The preset `name` as the run arguments ask: debug variant, data directory, `--set` overrides."""
    from jnn import presets

    return presets.from_args(name, debug=args.debug, data_dir=args.data_dir, assignments=args.set)


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for the command line (not for the library).

    A repeated `jnn train` then loads its compiled init and step instead of compiling them again
    (what that saves: `benchmarks/studies/README.md`). The cache lives in
    `$JNN_COMPILATION_CACHE` (default `~/.cache/jnn/xla`); set it to an empty string to turn the
    cache off. A cache directory already configured for JAX is left as it is.

    Returns:
      The cache directory in use, or None.
    """
    import jax

    path = os.environ.get("JNN_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jnn", "xla"))
    if not path:
        return None
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return jax.config.jax_compilation_cache_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jnn", description="JAX functional neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a preset (default: a CNN on the bundled digits)")
    train.add_argument("--preset", default=None, help="a preset name (see `jnn presets`); default: digits")
    add_run_arguments(train)
    train.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    train.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                       help="stop at STEP with a checkpoint, as if preempted; continue with --resume")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar (default: when stderr is a terminal)")
    train.add_argument("--processes", type=int, default=1, metavar="N",
                       help="run as N data-parallel processes on this machine, one CPU device each (a cluster "
                            "starts one `jnn train` per host with JNN_COORDINATOR, JNN_NUM_PROCESSES, "
                            "JNN_PROCESS_ID)")
    train.add_argument("--summary", action="store_true",
                       help="print the model summary (layers, shapes, parameters, FLOPs, memory) before training")
    train.add_argument("--profile", default=None, metavar="START:STOP",
                       help="record a jax.profiler trace of steps START to STOP-1 (10:12: steps 10 and 11) into "
                            "RUN_DIR/profile, for TensorBoard or Perfetto")
    train.add_argument("--timeout", type=int, default=None, metavar="S",
                       help="multi-process runs: seconds to wait for the other processes to connect, and "
                            "after which a silent process counts as dead (default 120)")
    train.add_argument("--no-cluster", action="store_true",
                       help="ignore SLURM / Open MPI variables: train as one process (JNN_CLUSTER=off)")
    train.add_argument("--requeue", action="store_true",
                       help="under SLURM, after a preemption checkpoint, requeue the job (`scontrol requeue`)")

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on the test split")
    ev.add_argument("run_dir")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
    ev.add_argument("--data-dir", default=None, help="where the data is now, if it moved")

    ex = sub.add_parser("export", help="write a run's model as StableHLO or ONNX (checked against JAX first)")
    ex.add_argument("run_dir")
    ex.add_argument("--format", default="stablehlo", choices=("stablehlo", "onnx"))
    ex.add_argument("--output", default=None, help="the file to write (default: RUN_DIR/model.<format>)")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
    ex.add_argument("--data-dir", default=None, help="where the run's data is now, if it moved")

    pr = sub.add_parser("predict", help="predictions and class probabilities of a run's model on a file or folder")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", help="a .npy / .npz file (its 'inputs' array) or a folder of images")
    pr.add_argument("--output", default="predictions.npz", help="the .npz file to write (default: predictions.npz)")
    pr.add_argument("--batch-size", type=int, default=256)
    pr.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
    pr.add_argument("--data-dir", default=None, help="where the run's data is now, if it moved")
    pr.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar (default: when stderr is a terminal)")

    sub.add_parser("info", help="JAX backend, devices and versions")
    sub.add_parser("presets", help="list the training presets")
    models = sub.add_parser("models", help="list the model zoo, or summarise one model")
    models.add_argument("name", nargs="?", default=None, help="a model of the zoo (with --summary)")
    models.add_argument("--summary", action="store_true",
                        help="print NAME's layers, output shapes, parameters, FLOPs and memory (with Adam)")
    models.add_argument("--batch-size", type=int, default=1, help="the summary's example batch size")
    sub.add_parser("bench", add_help=False,
                   help="run the benchmark harness of a source checkout: `python -m benchmarks ARGS` (see --help)")
    return parser


def _launch(args, argv: list[str]) -> int:
    """`--processes N`: this process starts N copies of the same command and owns them."""
    from jnn.parallel._launch import launch_local  # without JAX: the launcher only owns its children

    _collector.resume()  # this process waits for its children: no start-up of its own
    if args.processes < 1:
        raise ValueError(f"--processes {args.processes}: expected a positive number of processes.")
    run_dir = [] if args.resume or args.run_dir else ["--run-dir", default_run_dir(args.preset or "digits", args.debug)]
    child = [sys.executable, "-m", "jnn.cli", *argv, *run_dir]
    return launch_local(child, args.processes, devices_per_process=1)


def _train(args) -> int:
    from jnn import _claim
    from jnn.train.preemption import Preempted, watch_signals_until_exit

    watch_signals_until_exit()  # from here on a scheduler's signal stops training at a step, with a checkpoint
    if args.resume or args.run_dir:  # a run still writing there: refuse at once, before JAX or connecting
        _claim.probe(os.path.abspath(args.resume or args.run_dir))
    enable_compilation_cache()
    from jnn import parallel

    if args.no_cluster:
        os.environ["JNN_CLUSTER"] = "off"
    timeout = {} if args.timeout is None else {"timeout_s": args.timeout}
    try:
        return _train_joined(args, parallel.initialize(**timeout))
    except Preempted:
        if args.requeue and os.environ.get("SLURM_JOB_ID") and parallel.process_index() == 0:
            _requeue(os.environ["SLURM_JOB_ID"])
        raise


def _requeue(job_id: str) -> None:
    """`scontrol requeue JOB`: SLURM runs the batch script again (it resumes from the checkpoint)."""
    import subprocess

    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    print(f"jnn train: `scontrol requeue {job_id}`: "
          + ("done" if done.returncode == 0 else f"failed ({done.stderr.strip() or done.returncode})"),
          file=sys.stderr, flush=True)


def _train_joined(args, multi_process: bool) -> int:
    from jnn import parallel

    if not multi_process:  # one process, or this one joined a multi-process run
        return _train_process(args)
    if not (args.resume or args.run_dir):
        raise ValueError("a multi-process `jnn train` needs --run-dir DIR (or --resume DIR): every process must "
                         "write the same run directory. Fix: pass the same --run-dir to every process.")
    where = args.resume or args.run_dir
    with parallel.stop_all_on_failure(
            "jnn train", hint=f"Fix the first error printed, then continue from the last checkpoint with the same "
                              f"processes: `jnn train --resume {where}`."):
        return _train_process(args)


def _train_process(args) -> int:
    from jnn import experiment

    if args.resume:
        extra = [flag for flag, given in (("--preset", args.preset), ("--debug", args.debug), ("--set", args.set),
                                          ("--run-dir", args.run_dir)) if given]
        if extra:
            raise ValueError(f"--resume continues a run with the config it started with; got {', '.join(extra)} too. "
                             f"Fix: drop them (only --data-dir, --stop-at, --progress, --summary and --profile go "
                             f"with --resume), or start a new run.")
        experiment.resume(args.resume, data_dir=args.data_dir, progress=args.progress, stop_at=args.stop_at,
                          summary=args.summary, profile=args.profile)
        return 0
    name = args.preset or "digits"
    config = config_from_args(name, args)
    run_dir = args.run_dir or default_run_dir(name, args.debug)
    experiment.train(config, run_dir, progress=args.progress, stop_at=args.stop_at, summary=args.summary,
                     profile=args.profile)
    return 0


def _info() -> int:
    import importlib.metadata as md

    import jax

    print(f"jax backend: {jax.default_backend()}")
    print(f"devices ({jax.device_count()}): {', '.join(str(d) for d in jax.devices())}")
    print(f"processes: {jax.process_count()} (this is {jax.process_index()})")
    for package in ("jnn", "jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "grain", "numpy"):
        try:
            print(f"{package}: {md.version(package)}")
        except md.PackageNotFoundError:
            print(f"{package}: not installed")
    return 0


def _models(args) -> int:
    from jnn import models

    if args.name is None:
        if args.summary:
            raise ValueError("--summary needs a model name: expected `jnn models NAME --summary`, e.g. "
                             "`jnn models resnet20 --summary` (`jnn models` lists the names).")
        for name in models.names():
            print(f"{name:28s} {models.spec(name).description}")
        return 0
    spec = models.spec(args.name)  # an unknown name lists the valid ones
    if not args.summary:
        print(f"{spec.name:28s} {spec.description}")
        return 0
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected a positive batch size.")
    import optax

    from jnn._summary import summary

    x = models.example_input(args.name, batch_size=args.batch_size)
    print(f"{spec.name}: {spec.description}")
    print(summary(models.get(args.name), x, tx=optax.adam(1e-3)))
    return 0


def _bench(argv: list[str]) -> int:
    """`jnn bench ARGS`: `python -m benchmarks ARGS` from the source checkout jnn runs from.

    The harness is not part of the installed package (it starts PyTorch and scikit-learn peers and
    writes results next to the code it measures), so it runs from a checkout: the one this `jnn`
    is imported from (an editable install), else the current directory if it is one.
    """
    import subprocess
    from pathlib import Path

    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks" / "__main__.py").is_file() and (root / "jnn" / "__init__.py").is_file():
            return subprocess.call([sys.executable, "-m", "benchmarks", *argv], cwd=root)
    print("jnn bench: error: the benchmark harness lives in jnn's source repository, not in the installed "
          "package. Fix: run it from a checkout: `cd <jnn checkout> && python -m benchmarks --quick` (or "
          "`pip install -e .` there, then `jnn bench`).", file=sys.stderr)
    return 2


def _export_or_predict(args) -> int:
    """`jnn export` and `jnn predict`: the run's best (else newest) checkpoint, in evaluation mode."""
    import jnn
    from jnn.predict import predict_to_file

    model = jnn.load(args.run_dir, step=args.step, data_dir=args.data_dir)
    if args.command == "export":
        output = args.output or os.path.join(model.run_dir, f"model.{args.format}")
        print(jnn.export(model, model.example_inputs(2), args.format, output))
        return 0
    result = predict_to_file(model, args.inputs, args.output, batch_size=args.batch_size, progress=args.progress)
    print(f"wrote predictions and probabilities of {len(result['predictions'])} example(s) to {args.output} "
          f"(checkpoint step {int(model.state.step)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `jnn` console command. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every other argument belongs to the harness
        _collector.resume()
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    if args.command != "train":
        _collector.resume()  # the `jnn` command's start-up ends here, unless it trains (then at its first step)
    try:
        if args.command in ("eval", "export", "predict"):  # `train` turns it on after its quick checks
            enable_compilation_cache()
        if args.command == "train":
            if args.processes != 1 and "JNN_PROCESS_ID" not in os.environ:
                return _launch(args, list(sys.argv[1:] if argv is None else argv))
            return _train(args)
        if args.command == "eval":
            from jnn import experiment

            experiment.evaluate_run(args.run_dir, step=args.step, data_dir=args.data_dir)
            return 0
        if args.command in ("export", "predict"):
            return _export_or_predict(args)
        if args.command == "info":
            return _info()
        if args.command == "presets":
            from jnn import presets

            for name in presets.names():
                doc = (getattr(presets, name).__doc__ or "").strip().splitlines()[0]
                print(f"{name:20s} {doc}")
            return 0
        if args.command == "models":
            return _models(args)
    except (ValueError, OSError) as err:  # user errors (bad input, files, NaN data): one line
        print(f"jnn {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1


def console() -> None:
    """The `jnn` console command and `python -m jnn.cli`: `main`, then exit without a last garbage collection.

    At exit Python collects the garbage of every module, over the millions of objects that JAX, flax
    and matplotlib leave behind: 0.35-0.5 s of the default `jnn train`'s ~5 s. `gc.freeze()` moves
    them out of the collector's reach first (the Instagram recipe; the memory goes back to the system
    with the process). Nothing is lost: jnn closes its files, checkpoints and writers before `main`
    returns, `atexit` handlers (trackers', multiprocessing's) still run, and objects freed by their
    reference count are still freed. Only here, not in `main`: a program that calls `main` keeps
    collecting its garbage.

    Also only here: the collector is off while the command starts up, until `jnn train`'s first step
    (`jnn._collector`: 0.42 s of the default run's 4.3 s).
    """
    import gc

    _collector.pause()  # until training starts: `jnn._collector`
    try:
        code = main()
    finally:
        gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
