"""jnn side by side with what users pick instead, in one run: `python -m benchmarks` (or `jnn bench`).

  python -m benchmarks --quick                     # every CPU workload, under 10 minutes on 2 cores
  python -m benchmarks --workloads W1 W4           # a selection, full rounds
  python -m benchmarks --suite gpu                 # GPT-2 small, ResNet-50, `jnn train` on one GPU
  python -m benchmarks --suite gpu --tiny          # the GPU suite's code paths at toy sizes (CPU)

CPU suite: W1 tiny MLP (batch 32, dispatch-bound), W2 time to 98% test accuracy on the digits,
W3 Keras MNIST CNN (batch 128), W4 compute-bound MLP 1024-2048x4-1024 (batch 1024), W5 CIFAR
ResNet-20 (batch 128), W6 GPT decoder (4 layers, width 256, context 128), W7 LSTM language model,
W8 data-parallel steps on 2/4/8 fake CPU devices (`benchmarks/parallel.py`). Each workload runs
in its own process (`benchmarks/harness.py`), each PyTorch peer in another one. Writes
`results/bench-<suite>-<date>.json`, `.md` and `.png` (see README.md, "How to read the results").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common, report

ROOT = Path(__file__).resolve().parent.parent
CPU_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8")
GPU_WORKLOADS = ("G1", "G2", "G3")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "scikit-learn", "matplotlib")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds and seeds, no torch.compile, no jnn_default: every CPU workload in minutes")
    p.add_argument("--tiny", action="store_true", help="gpu suite: toy sizes, so its code paths run on a CPU")
    p.add_argument("--workloads", nargs="+", default=None, metavar="W",
                   help=f"cpu: {' '.join(CPU_WORKLOADS)}; gpu: {' '.join(GPU_WORKLOADS)} (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, --quick 3, gpu 5)")
    p.add_argument("--block-seconds", type=float, default=None, help="target time of one block of steps")
    p.add_argument("--seeds", type=int, default=None, help="W2 seeds (default 10, --quick 3)")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="threads of the PyTorch peers")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the torch.compile peers (default: yes, except with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="G3: fresh `jnn train` processes (default 2, --tiny 1)")
    p.add_argument("--worker-timeout", type=float, default=None,
                   help="seconds after which a workload's process (and its peers) is killed and recorded as an "
                        "error, so one hang cannot cost a whole run (default: none)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    valid = CPU_WORKLOADS if args.suite == "cpu" else GPU_WORKLOADS
    args.workloads = args.workloads or list(valid)
    unknown = [w for w in args.workloads if w not in valid]
    if unknown:
        p.error(f"unknown workload(s) {unknown} for suite {args.suite}; expected some of {list(valid)}")
    small = args.quick or args.tiny
    args.rounds = args.rounds or (3 if small else 5 if args.suite == "gpu" else 9)
    args.block_seconds = args.block_seconds or (0.15 if small else 0.5 if args.suite == "gpu" else 0.25)
    args.seeds = args.seeds or (3 if small else 10)
    args.torch_compile = (not small) if args.torch_compile is None else args.torch_compile
    args.repeats = args.repeats or (1 if small else 2)
    return args


def worker_command(args, workload: str, out: str) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.harness", "--out", out, "--suite", args.suite,
           "--rounds", str(args.rounds), "--block-seconds", str(args.block_seconds),
           "--torch-threads", str(args.torch_threads), "--seeds", str(args.seeds),
           "--max-steps", str(500 if args.quick else 1000)]
    peers = ["jnn"] if args.suite == "gpu" else ["jnn", "jnn_jax_jit", "raw", "flax"]
    if not (args.quick or args.tiny) and args.suite == "cpu":
        peers.append("jnn_default")
        cmd += ["--full", "--compile-rounds", "3"]
    if not args.no_torch:
        if args.suite == "cpu":
            peers += ["torch_eager", "torch_eager_1t"]
        if args.torch_compile:
            peers.append("torch_compile")
        elif args.suite == "gpu":
            peers.append("torch_eager")
    return cmd + [workload, "--peers", *peers] + (["--tiny"] if args.tiny else [])


def run_process(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[int, str, dict]:
    """Runs `cmd` from the repository root, its stdout passed through; (exit code, stderr, usage).

    The child runs in its own process group, with its PyTorch peers. After `timeout` seconds the
    whole group is killed and the stderr gets a last line saying so; if this process is
    interrupted or terminated first, the group is killed too (no worker outlives the run).
    """
    import subprocess
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    expired, done = threading.Event(), threading.Event()

    def kill():
        if not done.is_set():
            expired.set()
            common.kill_group(proc.pid)

    timer = threading.Timer(timeout, kill) if timeout else None
    try:
        if timer:
            timer.start()
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage (max RSS)
        done.set()
    finally:
        if timer:
            timer.cancel()
        if not done.is_set():  # interrupted: take the worker and its peers down with us
            common.kill_group(proc.pid)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if expired.is_set():
        err += f"\nkilled after the worker timeout of {timeout:.0f} s (--worker-timeout)\n"
    return proc.returncode, err, {"max_rss_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start,
                                  "cpu_s": usage.ru_utime + usage.ru_stime}


def run_worker(args, workload: str, env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="jnn-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        code, err, usage = run_process(worker_command(args, workload, out), env, args.worker_timeout)
        if code == 3:  # the loss check failed: the comparison would be meaningless
            raise SystemExit(f"{workload}: {err.strip().splitlines()[-1]}")
        if code:
            tail = [line for line in err.strip().splitlines() if line.strip()][-1:] or [f"exit code {code}"]
            print(err[-3000:], file=sys.stderr)
            return {"error": f"worker failed ({tail[0][:300]})"}
        return {**json.loads(Path(out).read_text()), "seconds": usage["seconds"]}


def run_parallel(args, env: dict) -> dict:
    """W8: `python -m benchmarks.parallel` on 2, 4 and 8 fake CPU devices, each in a fresh process."""
    devices = {}
    for n in (2, 4, 8):
        with tempfile.TemporaryDirectory(prefix="jnn-bench-parallel-") as tmp:
            cmd = [sys.executable, "-m", "benchmarks.parallel", "--devices", str(n),
                   "--rounds", str(args.rounds if args.quick else 21), "--steps", str(5 if args.quick else 15),
                   "--out", tmp]
            if args.quick:  # the like-for-like loss-only pairs: 4 programs to compile instead of 10
                cmd += ["--variants", "hand_jit", "jnn_jit_bare", "hand_pmap", "jnn_pmap_bare"]
            print(f"W8: {n} fake CPU devices", flush=True)
            code, err, usage = run_process(cmd, dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}"))
            files = list(Path(tmp).glob("parallel-*.json"))
            if code or not files:
                print(err[-3000:], file=sys.stderr)
                devices[str(n)] = {"error": f"exit code {code}"}
                continue
            data = json.loads(files[0].read_text())
            devices[str(n)] = {"ratios": data["ratios"], "median_step_ms": data["median_step_ms"], **usage}
    return {"kind": "parallel", "title": "data-parallel MLP step on fake CPU devices (benchmarks/parallel.py)",
            "devices": devices}


def run_workloads(args, env: dict) -> dict:
    """name -> result of every workload asked for, one after the other."""
    def run_one(name: str) -> dict:
        if name == "W8":
            return run_parallel(args, env)
        if name == "G3":
            from benchmarks import gpu

            print("G3: `jnn train` in a fresh process", flush=True)
            return gpu.default_run(args.tiny, args.repeats, args.worker_timeout)
        return run_worker(args, name, env)

    return {name: run_one(name) for name in args.workloads}


def main(argv=None) -> int:
    import signal

    args = parse_args(argv)
    # `timeout` and schedulers send SIGTERM: exit through Python so that `run_process` kills its worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    suite = args.suite + ("-tiny" if args.tiny else "-quick" if args.quick else "")
    env = common.environment(PACKAGES)
    # Workers: no persistent compilation cache (every compile is a first compile), a CPU run stays
    # on the CPU, and `benchmarks` is importable from the repository root.
    child_env = dict(os.environ, JNN_COMPILATION_CACHE="", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    if args.suite == "cpu" or args.tiny:
        child_env["JAX_PLATFORMS"] = "cpu"
    else:  # the PyTorch peer shares the GPU with the JAX worker, which keeps its memory while it waits
        child_env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    print(common.env_line(env), flush=True)
    start = time.perf_counter()
    skipped = []
    if args.no_torch:
        skipped.append("PyTorch peers: skipped (--no-torch)")
    elif not common.version("torch"):
        skipped.append("PyTorch not installed: its peers are skipped (pip install torch==2.13.0)")
    if not args.torch_compile and not args.no_torch:
        skipped.append("torch.compile peers: not run (--quick or --no-torch-compile; pass --torch-compile)")
    workloads = run_workloads(args, child_env)
    for w in workloads.values():
        skipped += [s for s in w.pop("skipped", []) if s not in skipped]
    info = next((w for w in workloads.values() if "backend" in w), {})
    matmul = [w["matmul"] for w in workloads.values() if "matmul" in w]  # measured by every worker
    peak_flops = {d: max(m[d]["flops_per_s"] for m in matmul if d in m) for d in (matmul[0] if matmul else {})}
    result = {
        "suite": suite, "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "backend": info.get("backend"), "device_kind": info.get("device_kind"), "peak": matmul,
        "peak_flops_per_s": peak_flops, "skipped": skipped, "workloads": workloads,
    }
    if args.suite == "gpu":
        from benchmarks import gpu

        dense = gpu.dense_bf16_peak(info.get("device_kind") or "")
        result["dense_peak_tflops"] = dense / 1e12 if dense else None
        for w in workloads.values():  # MFU: analytic model FLOP/s over the dense bf16 peak
            for c in w.get("candidates", {}).values():
                if isinstance(c, dict) and dense and c.get("model_flops_per_s"):
                    c["mfu"] = c["model_flops_per_s"] / dense
    result["targets"] = report.check_targets(workloads, report.TARGETS if args.suite == "cpu" else report.GPU_TARGETS)
    result["seconds"] = time.perf_counter() - start
    common.finish(env)
    result = {"benchmark": f"bench-{suite}", "environment": env, "config": vars(args), **result}
    text = report.markdown(result)
    print(text)
    if not args.no_save:
        path = common.write_results(f"bench-{suite}", result, text, args.out)
        why = report.plot(result, path.with_suffix(".png"))
        png = path.with_suffix(".png").name
        print(f"wrote {path}, {path.with_suffix('.md').name}" + (f"; {why}" if why else f", {png}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
