"""Cost of jnn's parallel train steps vs the same steps written by hand, on N (fake) devices.

The harness's W8 runs it on 2, 4 and 8 fake CPU devices, one process each; alone:

  python -m benchmarks.parallel                 # 8 fake CPU devices, writes benchmarks/results/studies/
  python -m benchmarks.parallel --devices 4 --rounds 21 --steps 15

Variants, all on the same model (MLP 784-512-512-10), optimizer (Adam) and global batch:
  hand_jit          jax.jit + NamedSharding of a hand-written raw JAX + optax step: loss only
  hand_jit_metrics  the same, also computing accuracy and the gradient norm (what jnn reports)
  jnn_jit_bare      jnn.parallel.data_parallel(jnn.make_train_step(loss, metrics=("loss",)), mesh)
  jnn_jit           jnn.parallel.data_parallel(jnn.make_train_step(loss), mesh): default metrics
  core_jit          jax.jit + NamedSharding of jnn.make_train_step(loss), wrapped by hand
and the same five under pmap (hand_pmap... with psum/pmean; jnn_pmap* via
jnn.parallel.pmap_train_step; core_pmap = jax.pmap of make_train_step(loss, axis_name="batch")).

The like-for-like ratios, held to 1.05 by issue 5: jnn_*_bare / hand_* (the same work: loss only)
and jnn_* / hand_*_metrics (the same work: loss, accuracy, gradient norm; plain optax.adam exposes
no learning rate to report). The ratio jnn_* / hand_* is what jnn's default metrics cost over a
loss-only step.

Timing (benchmarks/common.py): rounds interleave the variants, the order reversed every other
round; a ratio is the median of the per-round ratios, with its [min, max]. Both wall and process
CPU time are recorded; on N fake devices all N run on this machine's cores.
"""
from __future__ import annotations

import argparse
import os
import sys

from benchmarks import common

RATIOS = [  # (numerator, denominator, limit)
    ("jnn_jit_bare", "hand_jit", 1.05), ("jnn_jit", "hand_jit_metrics", 1.05), ("jnn_jit", "hand_jit", None),
    ("jnn_jit", "core_jit", None), ("hand_jit_metrics", "hand_jit", None),
    ("jnn_pmap_bare", "hand_pmap", 1.05), ("jnn_pmap", "hand_pmap_metrics", 1.05), ("jnn_pmap", "hand_pmap", None),
    ("jnn_pmap", "core_pmap", None), ("hand_pmap_metrics", "hand_pmap", None),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=512, help="global batch")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=15, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--variants", nargs="+", default=None, help="time only these variants (default: all)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/studies)")
    return p.parse_args(argv)


def build_variants(args):
    """name -> run(steps) -> seconds, for every variant (each holds its own state)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jnn
    from jnn import parallel

    class MLP(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(self.width)(x))
            x = nn.relu(nn.Dense(self.width)(x))
            return nn.Dense(10)(x)

    loss_fn = optax.softmax_cross_entropy_with_integer_labels
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.normal(size=(args.batch_size, 784)).astype(np.float32),
             "labels": rng.integers(0, 10, args.batch_size).astype(np.int32)}
    model, tx = MLP(args.width), optax.adam(1e-3)
    state0 = jnn.create_train_state(model, tx, batch["inputs"][:1], jax.random.key(0))

    def fresh(tree):  # private buffers: placing may alias device 0's buffer, and steps donate
        return jax.tree.map(jnp.copy, tree)

    def raw_step(params, opt_state, batch, axis_name=None, metrics=False):
        def loss(p):
            logits = model.apply({"params": p}, batch["inputs"])
            return jnp.mean(loss_fn(logits, batch["labels"])), logits

        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["labels"]) if metrics else None
        if axis_name is not None:
            grads, value, accuracy = jax.lax.pmean((grads, value, accuracy), axis_name)
        updates, opt_state = tx.update(grads, opt_state, params)
        out = {"loss": value}
        if metrics:
            out.update(accuracy=accuracy, grad_norm=optax.tree.norm(grads))
        return optax.apply_updates(params, updates), opt_state, out

    mesh = parallel.make_mesh()
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    pbatch = parallel.pmap_shard_batch(batch)
    variants = {}  # name -> (step(state, batch) -> state, state, batch)
    for metrics, suffix in ((False, ""), (True, "_metrics")):
        hand = jax.jit(lambda p, o, b, m=metrics: raw_step(p, o, b, metrics=m), in_shardings=(rep, rep, split),
                       out_shardings=rep, donate_argnums=(0, 1))
        variants["hand_jit" + suffix] = (lambda s, b, f=hand: f(*s, b)[:2],
                                         jax.device_put(fresh((state0.params, state0.opt_state)), rep),
                                         jax.device_put(batch, split))
        hand_p = jax.pmap(lambda p, o, b, m=metrics: raw_step(p, o, b, "batch", m), axis_name="batch",
                          donate_argnums=(0, 1))
        variants["hand_pmap" + suffix] = (lambda s, b, f=hand_p: f(*s, b)[:2],
                                          parallel.pmap_replicate(fresh((state0.params, state0.opt_state))), pbatch)
    for which, suffix in ((None, ""), (("loss",), "_bare")):
        kwargs = {"on_nonfinite": "apply"} if which is None else {"metrics": which, "on_nonfinite": "apply"}
        dp = parallel.data_parallel(jnn.make_train_step(loss_fn, **kwargs), mesh)
        variants["jnn_jit" + suffix] = (lambda s, b, f=dp: f(s, b)[0], dp.shard_state(fresh(state0)),
                                        dp.shard_batch(batch))
        pm = parallel.pmap_train_step(jnn.make_train_step(loss_fn, axis_name="batch", **kwargs))
        variants["jnn_pmap" + suffix] = (lambda s, b, f=pm: f(s, b)[0], pm.replicate(fresh(state0)), pbatch)
    core = jax.jit(jnn.make_train_step(loss_fn, on_nonfinite="apply"), in_shardings=(rep, split), out_shardings=rep, donate_argnums=0)
    variants["core_jit"] = (lambda s, b: core(s, b)[0], jax.device_put(fresh(state0), rep), jax.device_put(batch, split))
    core_p = jax.pmap(jnn.make_train_step(loss_fn, axis_name="batch", on_nonfinite="apply"), axis_name="batch", donate_argnums=0)
    variants["core_pmap"] = (lambda s, b: core_p(s, b)[0], parallel.pmap_replicate(fresh(state0)), pbatch)

    import time

    def runner(step, state, b):
        holder = {"state": state}

        def run(steps: int) -> float:
            s = holder["state"]
            start = time.perf_counter()
            for _ in range(steps):
                s = step(s, b)
            jax.block_until_ready(s)
            holder["state"] = s
            return time.perf_counter() - start

        return run

    return {name: runner(*v) for name, v in sorted(variants.items())}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    env = common.environment(("jax", "jaxlib", "flax", "optax", "numpy"))
    import jax

    candidates = {k: run for k, run in build_variants(args).items() if not args.variants or k in args.variants}
    wall, cpu = common.interleave(candidates, args.rounds, args.steps, warmup=2)
    common.finish(env)
    ratios = {f"{a} / {b}": {"wall": common.ratio(wall, a, b), "cpu": common.ratio(cpu, a, b), "limit": limit}
              for a, b, limit in RATIOS if a in wall and b in wall}
    result = {"benchmark": "parallel", **env, "backend": jax.default_backend(), "devices": args.devices,
              "config": vars(args), "wall_s": wall, "cpu_s": cpu,
              "median_step_ms": {k: 1e3 * common.spread(v)["median"] for k, v in wall.items()}, "ratios": ratios}
    lines = [f"# Parallel train steps: jnn vs hand-written ({env['date']})", "", common.env_line(env), "",
             f"{jax.default_backend()} x {args.devices} devices; MLP 784-{args.width}-{args.width}-10, Adam, global "
             f"batch {args.batch_size}; {args.rounds} interleaved rounds of {args.steps} steps per variant.", "",
             "| variant | wall ms/step (median) | CPU ms/step (median) |", "|---|---|---|"]
    lines += [f"| {k} | {1e3 * common.spread(wall[k])['median']:.2f} | {1e3 * common.spread(cpu[k])['median']:.2f} |"
              for k in wall]
    lines += ["", "| ratio | wall: median [min, max] | CPU: median [min, max] | limit |", "|---|---|---|---|"]
    for name, r in ratios.items():
        w, c = r["wall"], r["cpu"]
        lines.append(f"| {name} | {w['median']:.3f} [{w['min']:.2f}, {w['max']:.2f}] | "
                     f"{c['median']:.3f} [{c['min']:.2f}, {c['max']:.2f}] | {r['limit'] or ''} |")
    markdown = "\n".join(lines)
    common.write_results("parallel", result, markdown, args.out or common.STUDY_RESULTS)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
