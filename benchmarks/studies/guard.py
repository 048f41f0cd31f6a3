"""The non-finite guard's cost: `python -m benchmarks.studies.guard` (default W1 and W3, ~1 min on 2 cores).

For each harness workload (`benchmarks/workloads.py`), jnn's own step compiled as the harness
compiles it (`jnn.jit(jnn.make_train_step(...), donate_argnums=0)`, Adam(1e-3), the same synthetic
batches), four candidates in one process, blocks of steps interleaved over rounds:

  apply        on_nonfinite="apply", metrics ("loss", "accuracy"): the harness's jnn step
  skip         on_nonfinite="skip" (fit's and `jnn train`'s policy), same metrics: the guard
               checks the gradients' sum
  apply_norm   "apply" with the "grad_norm" metric too (fit's default metrics)
  skip_norm    "skip" with "grad_norm": the guard reads the norm the metric computes anyway

Ratios are medians of per-round ratios [min, max], wall-clock and CPU time of this process; the
issue's target is skip / apply <= 1.02. Writes results/studies/guard-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import optax

import jnn
from benchmarks import common
from benchmarks.harness import JaxCandidate
from benchmarks import workloads as wl

METRICS = ("loss", "accuracy")
CANDIDATES = {  # name -> (policy, metrics)
    "apply": ("apply", METRICS),
    "skip": ("skip", METRICS),
    "apply_norm": ("apply", METRICS + ("grad_norm",)),
    "skip_norm": ("skip", METRICS + ("grad_norm",)),
}
PAIRS = (("skip", "apply"), ("skip_norm", "apply_norm"), ("apply_norm", "apply"))


def bench_workload(name: str, rounds: int, block_seconds: float) -> dict:
    w = wl.cpu_workloads()[name]
    host = wl.make_batches(w)
    device = [jax.device_put(b) for b in host]
    state = jnn.create_train_state(w.model(), optax.adam(wl.LR), host[0]["inputs"][:1], 0, precision=w.precision)
    cands, first = {}, {}
    for label, (policy, metrics) in CANDIDATES.items():
        step = jnn.jit(jnn.make_train_step(wl.loss_fn, metrics=metrics, on_nonfinite=policy), donate_argnums=0)
        cands[label] = JaxCandidate(step, wl.copy(state), device)
        first[label] = cands[label].run(1)
    slowest = max(c.run(3) / 3 for c in cands.values())
    steps = max(3, min(1000, round(block_seconds / slowest)))  # one count for all: the same number of syncs
    wall, cpu = common.interleave({k: c.run for k, c in cands.items()}, rounds, steps, warmup=1)
    return {
        "title": w.title,
        "batch_size": w.batch_size,
        "steps_per_block": steps,
        "first_call_s": first,
        "wall_ms": {k: common.spread([t * 1e3 for t in v]) for k, v in wall.items()},
        "ratios": {f"{a} / {b}": {"wall": common.ratio(wall, a, b), "cpu": common.ratio(cpu, a, b)} for a, b in PAIRS},
    }


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# The non-finite guard's cost ({env['date'][:10]})", "", common.env_line(env), "",
             f"Backend {env['jax_backend']}. {result['config']['rounds']} interleaved rounds; ratio = median of "
             "per-round ratios [min, max]; target: skip / apply <= 1.02.", "",
             "| workload | apply ms | skip ms | skip / apply (wall) | (CPU) | apply_norm ms | skip_norm / apply_norm (wall) "
             "| (CPU) | apply_norm / apply (wall) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, w in result["workloads"].items():
        r = w["ratios"]

        def cell(pair, kind="wall"):
            s = r[pair][kind]
            return f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]" if kind == "wall" else f"{s['median']:.3f}"

        ms = {k: f"{v['median']:.3f}" for k, v in w["wall_ms"].items()}
        lines.append(f"| {name} {w['title']} (batch {w['batch_size']}) | {ms['apply']} | {ms['skip']} | "
                     f"{cell('skip / apply')} | {cell('skip / apply', 'cpu')} | {ms['apply_norm']} | "
                     f"{cell('skip_norm / apply_norm')} | {cell('skip_norm / apply_norm', 'cpu')} | "
                     f"{cell('apply_norm / apply')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.guard", description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["W1", "W3"])
    common.add_run_arguments(p, rounds=21, block_seconds=0.15)
    args = p.parse_args(argv)
    known = wl.cpu_workloads()
    unknown = [w for w in args.workloads if w not in known]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; expected some of {sorted(known)}")
    env = common.jax_environment()
    start = time.perf_counter()
    workloads = {name: bench_workload(name, args.rounds, args.block_seconds) for name in args.workloads}
    common.publish("guard", env, args, {"seconds": time.perf_counter() - start, "workloads": workloads}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
