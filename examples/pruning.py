"""Magnitude pruning of the digits CNN (Zhu & Gupta 2017): how much of it can go.

  python examples/pruning.py            # 600 dense steps, then 400 pruning steps per variant
  python examples/pruning.py --debug    # a few steps: the code path only

The CNN trains dense first; each variant then fine-tunes a copy of it with `jnn.pruning.Pruning`
last in the optimizer chain, its sparsity rising along Zhu & Gupta's cubic schedule over the first
three quarters of the fine-tune and held for the rest. Every kernel is pruned (the default
targets: parameters with ndim > 1; biases are kept). A "0%" variant fine-tunes for as many steps
without pruning, the fair baseline for the others. The table prints, as measured, the sparsity
reached over the pruned kernels and over all parameters, the test accuracy, and its change from
the dense model's.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="a few steps per variant")
    p.add_argument("--steps", type=int, default=600, help="dense training steps")
    p.add_argument("--prune-steps", type=int, default=400, help="fine-tuning steps per variant")
    p.add_argument("--frequency", type=int, default=10, help="recompute the masks every this many steps")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def variants() -> dict[str, tuple[float, str]]:
    """name -> (target sparsity, scope)."""
    return {
        "0% (fine-tune only)": (0.0, "layer"),
        "50% layer": (0.5, "layer"),
        "80% layer": (0.8, "layer"),
        "90% layer": (0.9, "layer"),
        "90% global": (0.9, "global"),
    }


def run(args: argparse.Namespace) -> list[dict]:
    import jax
    import optax

    import jnn
    from jnn import data
    from jnn.pruning import Pruning, sparsity_report

    splits = data.load("digits", val_fraction=0.1, seed=0)
    steps, prune_steps = (4, 8) if args.debug else (args.steps, args.prune_steps)
    frequency = 2 if args.debug else args.frequency
    model = jnn.models.get("digits_cnn", num_classes=splits.num_classes)
    test = lambda state: jnn.evaluate(state, data.Pipeline(splits.test, 256, train=False),  # noqa: E731
                                      loss_fn="cross_entropy")["accuracy"]

    state = jnn.create_train_state(model, optax.adam(1e-3), splits.train["inputs"][:1], args.seed)
    dense = jnn.fit(state, data.Pipeline(splits.train, 64, seed=args.seed), num_steps=steps,
                    loss_fn="cross_entropy", progress=False).state
    dense_accuracy = test(dense)
    report = sparsity_report(dense)
    rows = [{"variant": "dense", "target": 0.0, "scope": "-", "kernels": report["total"], "all": report["all"],
             "test_accuracy": dense_accuracy, "change": 0.0}]
    chosen = {k: v for k, v in variants().items() if not args.debug or k in ("50% layer", "90% global")}
    for name, (sparsity, scope) in chosen.items():
        pruning = Pruning(sparsity, end_step=max(prune_steps * 3 // 4, 1), frequency=frequency, scope=scope)
        tx = optax.chain(optax.adam(1e-3), pruning.transform())
        start = jax.tree.map(lambda x: x.copy(), dense)  # fit donates its state: each variant gets a copy
        start = start.replace(tx=tx, opt_state=tx.init(start.params))
        pruned = jnn.fit(start, data.Pipeline(splits.train, 64, seed=args.seed + 1), num_steps=steps + prune_steps,
                         loss_fn="cross_entropy", progress=False).state
        report = sparsity_report(pruned, pruning)
        accuracy = test(pruned)
        rows.append({"variant": name, "target": sparsity, "scope": scope, "kernels": report["total"],
                     "all": report["all"], "test_accuracy": accuracy, "change": accuracy - dense_accuracy,
                     "per_kernel": {k: v for k, v in report.items() if k not in ("total", "all")}})
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = run(args)
    print(f"digits CNN: {args.steps} dense steps, then {args.prune_steps} fine-tuning steps per variant "
          f"(sparsity reached at step {max(args.prune_steps * 3 // 4, 1)} of them)" if not args.debug
          else "digits CNN (--debug: a few steps; the figures mean nothing)")
    print(f"{'variant':20s} {'target':>6s}  {'kernels':>7s} {'all':>6s}   {'test acc':>8s} {'change':>7s}   "
          f"per kernel")
    for r in rows:
        per = " ".join(f"{k.split('/')[0]}={v:.2f}" for k, v in r.get("per_kernel", {}).items())
        print(f"{r['variant']:20s} {r['target']:6.0%}  {r['kernels']:7.2%} {r['all']:6.2%}   "
              f"{r['test_accuracy']:8.4f} {r['change']:+7.4f}   {per}")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
