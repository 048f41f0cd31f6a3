"""Train-step time of the CNN workloads with `jnn.layers`' CPU formulations vs XLA's native ops.

  python -m benchmarks.studies.cnn_layers                  # W3 and W5 + the per-op table, ~8 min
  python -m benchmarks.studies.cnn_layers --workloads W3 --rounds 5 --no-ops --no-save

Candidates per workload (`benchmarks/workloads.py`: W3 is the Keras MNIST CNN `cnn_keras_mnist`,
W5 CIFAR ResNet-20, both at batch 128), on the same synthetic batches and initial parameters:

  native          the hand-written step (`workloads.make_raw_step`: value_and_grad + optax.adam),
                  traced under `jnn.layers.using("native")` (flax's and XLA's own ops)
  fast            the same step traced under `jnn.layers.using("fast")`
  jnn_jit         fast, compiled with `jnn.jit` instead of `jax.jit` (what jnn's own steps run)
  torch_eager_1t  PyTorch eager at 1 and 2 threads, each in its own process (`torch_peer.py`);
  torch_eager_2t  `torch_eager_best` is, round by round, the faster of the two

The per-op table (`--no-ops` skips it) times forward + backward of the pooling layers and the
kernel gradient of each convolution shape of the two workloads, native vs fast (and fast under
`jnn.jit`).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

from benchmarks import common, harness, loss_check

WORKLOADS = ("W3", "W5")
# (name, input shape, window, strides, padding) of the pooling layers timed in the per-op table.
POOLS = (("W3 max_pool 2x2 #1", (128, 26, 26, 32), (2, 2), (2, 2), "VALID"),
         ("W3 max_pool 2x2 #2", (128, 11, 11, 64), (2, 2), (2, 2), "VALID"),
         ("ResNet stem max_pool 3x3/2", (32, 56, 56, 64), (3, 3), (2, 2), ((1, 1), (1, 1))),
         ("avg_pool 3x3/2", (32, 56, 56, 64), (3, 3), (2, 2), ((1, 1), (1, 1))))
# (name, input shape, output channels, strides, padding) of the convolutions (3x3 kernels).
CONVS = (("W3 conv 1->32", (128, 28, 28, 1), 32, (1, 1), "VALID"),
         ("W3 conv 32->64", (128, 13, 13, 32), 64, (1, 1), "VALID"),
         ("W5 stem 3->16", (128, 32, 32, 3), 16, (1, 1), ((1, 1), (1, 1))),
         ("W5 stage 1 16->16", (128, 32, 32, 16), 16, (1, 1), ((1, 1), (1, 1))),
         ("W5 stage 2 16->32 /2", (128, 32, 32, 16), 32, (2, 2), ((1, 1), (1, 1))))


def step_candidates(w, impls=("native", "fast", "jnn_jit")) -> dict:
    """name -> harness.JaxCandidate of the hand-written step, traced under each implementation.

    "native" and "fast" compile with `jax.jit`; "jnn_jit" is "fast" compiled with `jnn.jit` (what
    jnn's own steps run on CPU).
    """
    import jax
    import optax

    import jnn
    from benchmarks import workloads as wl
    from jnn import layers

    host = wl.make_batches(w)
    device = [jax.device_put(b) for b in host]
    model, tx = w.model(), optax.adam(wl.LR)
    variables = jax.jit(model.init)(jax.random.key(0), host[0]["inputs"][:1])
    params, stats = variables["params"], variables.get("batch_stats", {})
    cands, losses = {}, {}
    for impl in impls:
        jit = jnn.jit if impl == "jnn_jit" else jax.jit
        cand = harness.JaxCandidate(wl.make_raw_step(model, tx, jit=jit),
                                    (wl.copy(params), tx.init(params), wl.copy(stats)), device)
        # jit traces at the first call: the implementation is fixed here
        with layers.using("native" if impl == "native" else "fast"):
            losses[impl] = cand.first_step()
        cands[impl] = cand
    loss_check.check_same_loss(losses, reference=impls[0])
    return cands


def measure_workload(w, args) -> dict:
    cands = step_candidates(w)
    print(f"{w.name}: compiled in " + ", ".join(f"{k} {c.first_step_s:.1f} s" for k, c in cands.items()), flush=True)
    torch = {}
    if not args.no_torch and harness.torch_installed():
        for threads in (1, 2):
            peer = harness.TorchCandidate(harness.torch_spec(w, False, threads, "cpu"))
            if peer.ok:
                torch[f"torch_eager_{threads}t"] = peer
            else:
                print(f"  torch {threads}t skipped: {peer.info['error']}")
    runs = {**{k: c.run for k, c in cands.items()}, **{k: p.run for k, p in torch.items()}}
    # Size each candidate's block of steps to about --block-seconds.
    steps = {}
    for name, run in runs.items():
        out = run(1)
        steps[name] = max(1, round(args.block_seconds / (out[0] if isinstance(out, tuple) else out)))
    wall, cpu = common.interleave(runs, rounds=args.rounds, steps=steps, warmup=1)
    for peer in torch.values():
        peer.close()
    if torch:  # the faster thread count, round by round (on wall time)
        best = [min(torch, key=lambda k: wall[k][r]) for r in range(args.rounds)]
        wall["torch_eager_best"] = [wall[k][r] for r, k in enumerate(best)]
        cpu["torch_eager_best"] = [cpu[k][r] for r, k in enumerate(best)]
    pairs = [("jnn_jit", "native"), ("fast", "native")] + [(a, "torch_eager_best")
                                                         for a in ("jnn_jit", "fast", "native") if torch]
    return {"title": w.title, "batch_size": w.batch_size, "steps_per_block": steps,
            "compile_s": {k: c.first_step_s for k, c in cands.items()},
            "wall_ms": {k: common.spread([1e3 * t for t in v]) for k, v in wall.items()},
            "cpu_ms": {k: common.spread([1e3 * t for t in v]) for k, v in cpu.items()},
            "ratios": {f"{a} / {b}": {"wall": common.ratio(wall, a, b), "cpu": common.ratio(cpu, a, b)}
                       for a, b in pairs}}


def op_table(rounds: int) -> list[dict]:
    """Median ms of forward + backward of each pooling shape, and of each conv's kernel gradient."""
    import jax
    import jax.numpy as jnp

    import jnn
    from jnn import layers

    def timer(fn, *args, jit=jax.jit):
        fn = jit(fn)
        jax.block_until_ready(fn(*args))

        def run(n):
            start = time.perf_counter()
            for _ in range(n):
                out = fn(*args)
            jax.block_until_ready(out)
            return time.perf_counter() - start
        return run

    rows = []
    rng = jax.random.key(0)
    for name, shape, window, strides, padding in POOLS:
        pool = layers.avg_pool if name.startswith("avg") else layers.max_pool
        x = jax.random.normal(rng, shape)
        def loss(x, impl, pool=pool, args=(window, strides, padding)):
            return jnp.sum(pool(x, *args, impl=impl) ** 2)

        runs = {impl: timer(jax.grad(functools.partial(loss, impl=impl)), x) for impl in ("native", "fast")}
        rows.append({"op": f"{name} {shape}: forward + backward", **_op_times(runs, rounds)})
    for name, shape, features, strides, padding in CONVS:
        x = jax.random.normal(rng, shape)
        kernel = jax.random.normal(rng, (3, 3, shape[-1], features)) * 0.1

        def conv(k, x, impl, args=(strides, padding)):  # arrays as arguments: XLA folds captured constants
            return layers.conv_general_dilated(x, k, *args, dimension_numbers=("NHWC", "HWIO", "NHWC"), impl=impl)

        ct = jax.random.normal(rng, jax.eval_shape(lambda k, x: conv(k, x, "native"), kernel, x).shape)
        runs = {impl: timer(lambda k, x, ct, impl=impl: jax.vjp(lambda k: conv(k, x, impl), k)[1](ct)[0],
                            kernel, x, ct)
                for impl in ("native", "fast")}
        runs["jnn_jit"] = timer(lambda k, x, ct: jax.vjp(lambda k: conv(k, x, "fast"), k)[1](ct)[0], kernel, x, ct,
                                jit=jnn.jit)
        runs["forward"] = timer(lambda k, x: conv(k, x, "native"), kernel, x)
        rows.append({"op": f"{name} {shape}: kernel gradient", **_op_times(runs, rounds)})
    return rows


def _op_times(runs: dict, rounds: int) -> dict:
    wall, _ = common.interleave(runs, rounds=rounds, steps=3, warmup=1)
    return {**{f"{k}_ms": 1e3 * common.spread(v)["median"] for k, v in wall.items()},
            "fast / native": common.ratio(wall, "fast", "native")["median"]}


def markdown(result: dict) -> str:
    lines = [f"## CNN layers: `jnn.layers` fast (CPU) vs native ops ({result['environment']['date']})", "",
             common.env_line(result["environment"]), "",
             (f"Median of {result['config']['rounds']} interleaved rounds; ratios are medians of per-round ratios "
              "[min, max]."), ""]
    for name, r in result["workloads"].items():
        lines += [f"### {name}: {r['title']}, batch {r['batch_size']}", "",
                  "| candidate | wall ms/step | CPU ms/step | steps/block |", "|---|---|---|---|"]
        for k, v in r["wall_ms"].items():
            lines.append(f"| {k} | {v['median']:.1f} | {r['cpu_ms'][k]['median']:.1f} | "
                         f"{r['steps_per_block'].get(k, '')} |")
        lines += ["", "| ratio | wall | CPU |", "|---|---|---|"]
        for k, v in r["ratios"].items():
            lines.append(f"| {k} | {_fmt(v['wall'])} | {_fmt(v['cpu'])} |")
        lines.append("")
    if result.get("ops"):
        lines += ["### Per op (wall ms, median)", "",
                  "| op | native | fast | fast / native | fast under jnn.jit | conv forward |", "|---|---|---|---|---|---|"]
        for row in result["ops"]:
            fwd = f"{row['forward_ms']:.1f}" if "forward_ms" in row else ""
            under = f"{row['jnn_jit_ms']:.1f}" if "jnn_jit_ms" in row else ""
            lines.append(f"| {row['op']} | {row['native_ms']:.1f} | {row['fast_ms']:.1f} | "
                         f"{row['fast / native']:.2f} | {under} | {fwd} |")
    return "\n".join(lines)


def _fmt(s: dict) -> str:
    return f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block-seconds", type=float, default=0.5)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-ops", action="store_true", help="skip the per-op table")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/studies)")
    args = p.parse_args(argv)
    env = common.environment()
    from benchmarks import workloads as wl

    start = time.perf_counter()
    all_workloads = wl.cpu_workloads()
    workloads = {name: measure_workload(all_workloads[name], args) for name in args.workloads}
    ops = [] if args.no_ops else op_table(args.rounds)
    common.publish("cnn_layers", env, args, {"seconds": time.perf_counter() - start, "workloads": workloads,
                                              "ops": ops}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
