"""Overfitting on a small subset of the digits, and what early stopping, augmentation, the L2
penalty and a plateau schedule each do about it.

  python examples/regularization.py            # 10 examples per class, 1000 steps per variant
  python examples/regularization.py --debug    # a few steps: the code path only

An MLP trains on 10 digits per class (100 images) until it fits them exactly; each variant changes
one thing. Overfitting shows as the gap between the training set and the test set, in accuracy
and in loss; the table prints both for every variant, as measured.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="a few steps per variant")
    p.add_argument("--per-class", type=int, default=10, help="training examples per class")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def small_subset(train: dict, per_class: int, seed: int) -> dict:
    """`per_class` examples of every class, chosen with `seed`."""
    rng = np.random.default_rng(seed)
    labels = train["labels"]
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                          for c in np.unique(labels)])
    return {k: v[idx] for k, v in train.items()}


def variants():
    """name -> (OptimConfig overrides, augmentations, early stopping, plateau)."""
    import jnn
    from jnn import data

    return {
        "baseline": ({}, None, None, None),
        "early stopping": ({}, None, jnn.EarlyStopping("loss", "min", patience=4), None),
        "augmentation": ({}, [data.RandomCrop(padding=1)], None, None),
        "L2 penalty": ({"l2": 3e-3}, None, None, None),
        "plateau": ({"schedule": "plateau", "plateau_patience": 2}, None, None, "loss"),
    }


def run(args: argparse.Namespace) -> list[dict]:
    import jnn
    from jnn import data

    splits = data.load("digits", val_fraction=0.1, seed=0)
    small = small_subset(splits.train, args.per_class, args.seed)
    steps = 4 if args.debug else args.steps
    rows = []
    for name, (optim, augment, stopping, plateau_metric) in variants().items():
        config = jnn.OptimConfig("adam", 1e-3, **optim)
        model = jnn.models.MLP(hidden_sizes=(256, 256), num_classes=splits.num_classes)
        state = jnn.create_train_state(model, jnn.make_optimizer(config), small["inputs"][:1], args.seed)
        result = jnn.fit(state, data.Pipeline(small, 32, seed=args.seed, augment=augment), num_steps=steps,
                         loss_fn="cross_entropy", eval_data=lambda: data.Pipeline(splits.val, 256, train=False),
                         eval_every=2 if args.debug else 25, early_stopping=stopping, progress=False,
                         plateau=jnn.optim.plateau(config) if plateau_metric else None)
        train = jnn.evaluate(result.state, data.Pipeline(small, 256, train=False), loss_fn="cross_entropy")
        test = jnn.evaluate(result.state, data.Pipeline(splits.test, 256, train=False), loss_fn="cross_entropy")
        rows.append({"variant": name, "steps": int(result.state.step),
                     "train_accuracy": train["accuracy"], "test_accuracy": test["accuracy"],
                     "train_loss": train["loss"], "test_loss": test["loss"]})
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = run(args)
    print(f"{args.per_class} training examples per class; train vs test (the gap is the overfitting)")
    print(f"{'variant':16s} {'steps':>5s}  {'train acc':>9s} {'test acc':>8s} {'gap':>6s}   "
          f"{'train loss':>10s} {'test loss':>9s} {'gap':>6s}")
    for r in rows:
        print(f"{r['variant']:16s} {r['steps']:5d}  {r['train_accuracy']:9.4f} {r['test_accuracy']:8.4f} "
              f"{r['train_accuracy'] - r['test_accuracy']:6.3f}   {r['train_loss']:10.4f} {r['test_loss']:9.4f} "
              f"{r['test_loss'] - r['train_loss']:6.3f}")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
