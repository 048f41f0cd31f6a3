"""Where a non-finite guard's cost goes: `python -m benchmarks.studies.guard_variants` (~2 min on 2 cores).

Variants of one hand-written step (a harness workload's flax model, default W1, Adam(1e-3),
softmax cross-entropy, "loss" and "accuracy" metrics; `jax.jit` with the state donated), blocks of
the same number of steps interleaved over rounds, in one process:

  apply          the bare update
  barrier        every update waits for all gradients (`lax.optimization_barrier`), no check
  cond_true      the update in a `lax.cond` whose predicate does not read the gradients
  norm_metric    the global norm computed (as a metric), no guard
  cond_norm      `lax.cond` on isfinite(loss) and isfinite(global norm)
  cond_sum       `lax.cond` on per-leaf `jnp.sum`s
  cond_isfinite  `lax.cond` on per-leaf `jnp.isfinite(g).all()`
  cond_jnn       `lax.cond` on jnn's gradient check (`jnn.train.step._sums_finite`)
  select         the update always computed, then a select of new or old over the whole state

Ratios to `apply` are medians of per-round ratios [min, max] (wall, and CPU time of this process).
Writes results/studies/guard-variants-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import optax
from jax import lax

from benchmarks import common
from benchmarks.harness import JaxCandidate
from benchmarks import workloads as wl
from jnn.train.step import _sums_finite

VARIANTS = ("apply", "barrier", "cond_true", "norm_metric", "cond_norm", "cond_sum", "cond_isfinite", "cond_jnn",
            "select")


def make_step(model, tx, variant: str):
    def loss_of(params, x, y):
        logits = model.apply({"params": params}, x)
        return wl.loss_fn(logits, y).mean(), logits

    def step(carry, batch):
        params, opt_state, count = carry
        (loss, logits), grads = jax.value_and_grad(loss_of, has_aux=True)(params, batch["inputs"], batch["labels"])
        metrics = {"loss": loss, "accuracy": wl.accuracy(logits, batch["labels"])}

        def update():
            updates, new_opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state, count + 1

        def keep():
            return params, opt_state, count + 1

        leaves = jax.tree.leaves(grads)
        if variant == "apply":
            return update(), metrics
        if variant == "barrier":
            barred = lax.optimization_barrier(grads)
            updates, new_opt_state = tx.update(barred, opt_state, params)
            return (optax.apply_updates(params, updates), new_opt_state, count + 1), metrics
        if variant == "norm_metric":
            return update(), {**metrics, "grad_norm": optax.tree.norm(grads)}
        if variant == "select":
            ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
            return jax.tree.map(lambda new, old: jnp.where(ok, new, old), update(), keep()), metrics
        ok = {
            "cond_true": lambda: count >= 0,
            "cond_norm": lambda: jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)),
            "cond_sum": lambda: jnp.isfinite(loss + sum(jnp.sum(g) for g in leaves)),
            "cond_isfinite": lambda: jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.isfinite(g).all() for g in leaves])),
            "cond_jnn": lambda: jnp.isfinite(loss) & _sums_finite(grads),
        }[variant]()
        return lax.cond(ok, update, keep), metrics

    return jax.jit(step, donate_argnums=0)


def bench(name: str, variants: list[str], rounds: int, block_seconds: float) -> dict:
    w = wl.cpu_workloads()[name]
    host = wl.make_batches(w)
    device = [jax.device_put(b) for b in host]
    model, tx = w.model(), optax.adam(wl.LR)
    params = model.init(jax.random.key(0), host[0]["inputs"][:1])["params"]
    cands = {}
    for v in variants:
        p = wl.copy(params)
        cands[v] = JaxCandidate(make_step(model, tx, v), (p, tx.init(p), jnp.int32(0)), device)
        cands[v].run(1)
    slowest = max(c.run(3) / 3 for c in cands.values())
    steps = max(3, min(1000, round(block_seconds / slowest)))
    wall, cpu = common.interleave({k: c.run for k, c in cands.items()}, rounds, steps, warmup=1)
    base = variants[0]
    return {"title": w.title, "batch_size": w.batch_size, "steps_per_block": steps,
            "wall_ms": {k: common.spread([t * 1e3 for t in v]) for k, v in wall.items()},
            "ratios": {f"{v} / {base}": {"wall": common.ratio(wall, v, base), "cpu": common.ratio(cpu, v, base)}
                       for v in variants[1:]}}


def markdown(result: dict) -> str:
    env, w = result["environment"], result["workload"]
    lines = [f"# Where a non-finite guard's cost goes ({env['date'][:10]})", "", common.env_line(env), "",
             f"{result['config']['workload']}: {w['title']} (batch {w['batch_size']}), "
             f"{result['config']['rounds']} interleaved rounds of {w['steps_per_block']} steps.", "",
             "| variant | wall ms/step | / apply (wall) [min, max] | / apply (CPU) |", "|---|---|---|---|"]
    for v, ms in w["wall_ms"].items():
        r = w["ratios"].get(f"{v} / {result['config']['variants'][0]}")
        ratio = f"{r['wall']['median']:.3f} [{r['wall']['min']:.2f}, {r['wall']['max']:.2f}]" if r else "1"
        lines.append(f"| {v} | {ms['median']:.3f} | {ratio} | {r['cpu']['median']:.3f} |" if r else
                     f"| {v} | {ms['median']:.3f} | 1 | 1 |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.guard_variants", description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="W1", choices=sorted(wl.cpu_workloads()))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="the first is the baseline of the ratios")
    common.add_run_arguments(p, rounds=41, block_seconds=0.12)
    args = p.parse_args(argv)
    env = common.jax_environment()
    start = time.perf_counter()
    workload = bench(args.workload, args.variants, args.rounds, args.block_seconds)
    common.publish("guard-variants", env, args, {"seconds": time.perf_counter() - start, "workload": workload},
                   markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
