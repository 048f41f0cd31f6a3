"""Step time under jnn's precision policies vs float32, in one run (ready for the GPU run too).

  python -m benchmarks.studies.precision                 # digits_cnn, mlp_mnist, gpt_char_tiny
  python -m benchmarks.studies.precision --workloads resnet20 --rounds 5 --no-save

Candidates per workload, the same model and synthetic batches as `step.py`, Adam(1e-3):
  float32     jax.jit(jnn.make_train_step(loss), donate_argnums=0)
  mixed_bf16  the same state created with precision="mixed_bf16" (bfloat16 compute, float32
              master parameters and loss)
  mixed_f16   precision="mixed_f16": float16 compute with the dynamic loss scale
Blocks of steps interleaved over rounds, as in `step.py`; ratios are medians of per-round ratios.
On a CPU, XLA emulates most bfloat16/float16 arithmetic through float32 conversions, so a ratio
above 1 is expected there; on a GPU the low-precision matmuls are the point.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import optax

import jnn
from benchmarks import common
from benchmarks.studies.step import LR, WORKLOADS, JaxCandidate, copy, make_batches

POLICIES = ("float32", "mixed_bf16", "mixed_f16")


def bench_workload(name: str, rounds: int, block_seconds: float) -> dict:
    batch_size, num_classes = WORKLOADS[name]
    host = make_batches(name, batch_size, num_classes)
    device = [jax.device_put(b) for b in host]
    step = jax.jit(jnn.make_train_step("cross_entropy"), donate_argnums=0)
    cands = {}
    for policy in POLICIES:
        state = jnn.create_train_state(jnn.models.get(name), optax.adam(LR), host[0]["inputs"][:1], 0,
                                       precision=policy)
        cands[policy] = JaxCandidate(step, copy(state), device)
    for cand in cands.values():
        cand.run(1)
        cand.run(2)
    steps = {k: max(3, min(500, round(block_seconds / (c.run(2) / 2)))) for k, c in cands.items()}
    wall, cpu = common.interleave({k: c.run for k, c in cands.items()}, rounds, steps, warmup=1)
    return {
        "batch_size": batch_size,
        "wall_ms": {k: common.spread([t * 1e3 for t in v]) for k, v in wall.items()},
        "first_call_s": {k: c.first_call_s for k, c in cands.items()},
        "ratios": {f"{p} / float32": {"wall": common.ratio(wall, p, "float32"), "cpu": common.ratio(cpu, p, "float32")}
                   for p in POLICIES[1:]},
    }


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Step time by precision policy ({env['date'][:10]})", "", common.env_line(env), "",
             f"Backend {env['jax_backend']}. Median of {result['config']['rounds']} interleaved rounds; ratio = "
             "median of per-round ratios [min, max].", "",
             "| workload | policy | wall ms/step | ratio to float32 (wall) | ratio (CPU time) |", "|---|---|---|---|---|"]
    for name, w in result["workloads"].items():
        for policy in POLICIES:
            r = w["ratios"].get(f"{policy} / float32")
            ratio = f"{r['wall']['median']:.2f} [{r['wall']['min']:.2f}, {r['wall']['max']:.2f}]" if r else "1"
            cpu = f"{r['cpu']['median']:.2f}" if r else "1"
            lines.append(f"| {name} (batch {w['batch_size']}) | {policy} | {w['wall_ms'][policy]['median']:.3f} | "
                         f"{ratio} | {cpu} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["digits_cnn", "mlp_mnist", "gpt_char_tiny"],
                   choices=list(WORKLOADS))
    common.add_run_arguments(p, rounds=7, block_seconds=0.25)
    args = p.parse_args(argv)
    env = common.jax_environment()
    start = time.perf_counter()
    workloads = {name: bench_workload(name, args.rounds, args.block_seconds) for name in args.workloads}
    common.publish("precision", env, args, {"seconds": time.perf_counter() - start, "workloads": workloads},
                   markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
