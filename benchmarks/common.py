"""Shared helpers of the benchmark scripts: environment record, interleaved timing, result files.

The machine these run on is often shared, so absolute times drift with the load. What is
comparable is a *ratio measured in one run with the candidates interleaved*: every round runs each
candidate for a block of steps in turn (A B C A B C ...), so a load change hits all of them alike,
and a ratio is the median of the per-round ratios. Nothing here imports jax: `environment()` only
reads the versions of what is installed, so a script can time `import jax` after calling it.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

RESULTS = Path(__file__).resolve().parent / "results"  # the harness's runs: the headline table reads them
STUDY_RESULTS = RESULTS / "studies"  # the runs of `benchmarks/studies/`


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to `platform.processor()`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or None where the OS has none."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(packages: Iterable[str] = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")) -> dict:
    """Date, versions, CPU and load average at the start of a run (call `finish` at the end)."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "versions": {name: version(name) for name in packages},
        "machine": {
            "platform": platform.platform(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "load_average_start": load_average(),
        },
    }


def add_run_arguments(parser, rounds: int, block_seconds: float) -> None:
    """--rounds, --block-seconds, --out and --no-save, as the in-process benchmarks take them."""
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds")
    parser.add_argument("--block-seconds", type=float, default=block_seconds, help="target time of one block of steps")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/studies)")
    parser.add_argument("--no-save", action="store_true")


def jax_environment() -> dict:
    """`environment()` of a JAX-only benchmark, with the backend it runs on."""
    import jax

    env = environment(("jax", "jaxlib", "flax", "optax", "numpy"))
    env["jax_backend"] = jax.default_backend()
    return env


def finish(env: dict) -> dict:
    """Records the load average at the end of the run into `env` (and returns it)."""
    env["machine"]["load_average_end"] = load_average()
    return env


def spread(values: list[float]) -> dict:
    """Median, min, max and the interquartile range of a list of measurements."""
    values = sorted(values)
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median": statistics.median(values), "min": values[0], "max": values[-1],
            "q1": q[0], "q3": q[2], "n": len(values)}


def interleave(candidates: Mapping[str, Callable[[int], float]], rounds: int,
               steps: int | Mapping[str, int], warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Runs every candidate for `steps` steps per round, in turn, for `rounds` rounds.

    The order is reversed every other round (A B C, C B A, ...), so no candidate always runs
    right after the same neighbour (or first after a pause).

    Args:
      candidates: name -> `run(steps)`, which runs that many steps, waits for them to finish and
        returns the elapsed wall seconds (each candidate times itself, so it can sync its own way),
        or `(wall, cpu)` seconds for a candidate that runs in another process and measures that
        process's CPU time itself.
      rounds: measured rounds.
      steps: steps per block, for all candidates or per candidate (so that a slow peer's block
        takes about as long as the others').
      warmup: unmeasured rounds first (compilation, caches, allocator).

    Returns:
      (wall, cpu): name -> seconds per step, one value per round; wall-clock time, and the CPU
      time of this process (all threads, user + system), which a busy machine inflates less.
    """
    names = list(candidates)
    steps = {name: steps for name in names} if isinstance(steps, int) else dict(steps)
    for _ in range(warmup):
        for name, run in candidates.items():
            run(steps[name])
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            c0 = time.process_time()
            out = candidates[name](steps[name])
            spent = time.process_time() - c0
            if isinstance(out, tuple):
                out, spent = out
            wall[name].append(out / steps[name])
            cpu[name].append(spent / steps[name])
    return wall, cpu


def ratio(times: Mapping[str, list[float]], a: str, b: str) -> dict:
    """Spread of the per-round ratios a / b (both measured in the same rounds)."""
    return spread([x / y for x, y in zip(times[a], times[b])])


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn(), seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def write_results(name: str, result: dict, markdown: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Writes `<out_dir>/<name>-<date>.json` and `.md`; returns the JSON path."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown.rstrip() + "\n")
    return stem.with_suffix(".json")


def env_line(env: dict) -> str:
    """One markdown line describing the machine and versions of a run."""
    m, v = env["machine"], env["versions"]
    la0, la1 = m.get("load_average_start"), m.get("load_average_end")
    versions = ", ".join(f"{k} {x}" for k, x in v.items() if x)
    return (f"{env['date']}; {m['cpu_model']} x {m['cpu_count']} cores; {versions}; load average "
            f"(1/5/15 min) at start {la0}, at end {la1}.")


def publish(name: str, env: dict, args: Any, body: dict, markdown: Callable[[dict], str]) -> dict:
    """Ends a benchmark run: records the final load average in `env`, prints the markdown table of
    `{"benchmark": name, "environment": env, "config": vars(args), **body}` and writes both files
    (unless `args.no_save`, into `args.out` or `results/studies/`: only the studies publish). Returns the result."""
    finish(env)
    result = {"benchmark": name, "environment": env, "config": vars(args), **body}
    text = markdown(result)
    print(text)
    if not args.no_save:
        print(f"wrote {write_results(name, result, text, args.out or STUDY_RESULTS)}")
    return result


def kind_of(name: str, kinds: Iterable[tuple[str, Iterable[str]]]) -> str:
    """The first kind of `kinds` ((kind, substrings) pairs) with a substring in the lower-cased
    `name`, or "other": how the profiles group kernels and ops."""
    low = name.lower()
    for kind, keys in kinds:
        if any(k in low for k in keys):
            return kind
    return "other"


def kill_group(pid: int) -> None:
    """SIGKILLs the process group led by `pid` (a child started with `start_new_session=True` and
    everything it started), if it still exists."""
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # already gone
        pass
