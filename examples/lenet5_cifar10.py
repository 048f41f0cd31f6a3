"""LeNet-5 on CIFAR-10, the network of PyTorch's CIFAR-10 tutorial, trained with SGD + momentum 0.9.

  python examples/lenet5_cifar10.py --data-dir ~/data/cifar-10-batches-py   # full run: 6,000 steps of 32
  python examples/lenet5_cifar10.py --debug                                 # 8 steps of 16, in seconds
  python examples/lenet5_cifar10.py --set optim.learning_rate=0.001 --set train.steps=12000

Without --data-dir it trains on scikit-learn's bundled 8x8 digits, resized to 32x32x3 (no download).
Where `jnn train --preset lenet5_cifar10` runs the preset in one call, this one spells out the run as
the tutorial does: build the experiment, `jnn.fit`, then `jnn.evaluate` with a confusion matrix,
which gives the tutorial's per-class accuracy (recall) and more. (examples/train_loop.py goes one
level lower and writes the loop itself.)
"""
from __future__ import annotations

import argparse

import jax

import jnn
from jnn import cli, experiment

PRESET = "lenet5_cifar10"


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.add_run_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Trains LeNet-5, prints the test split's per-class report; returns the test metrics."""
    args = parse_args(argv)
    config = cli.config_from_args(PRESET, args)
    run_dir = args.run_dir or cli.default_run_dir(PRESET, args.debug)
    exp = experiment.build(config)  # splits, model, optimizer, initial state, batch pipelines, loss
    if exp.note:
        print("note:", exp.note)
    t = config.train
    # One compiled evaluation for validation and test; the confusion matrix gives the per-class report.
    eval_step = jax.jit(jnn.make_eval_step(exp.loss_fn, confusion=True))
    with jnn.writers.make_run_writers(run_dir, console=True) as writer:  # metrics.jsonl, tb/, curves.png, stdout
        result = jnn.fit(exp.state, exp.train_data, num_steps=t.steps, loss_fn=exp.loss_fn,
                         eval_step=eval_step, eval_data=lambda: exp.eval_data("val"), eval_every=t.eval_every,
                         log_every=t.log_every, writer=writer)
    test = jnn.evaluate(result.state, exp.eval_data("test"), eval_step)
    print(jnn.metrics.format_report(test["report"], exp.splits.class_names))
    print(f"test accuracy {test['accuracy']:.4f} after {int(result.state.step)} steps; run directory {run_dir}")
    return {"run_dir": run_dir, "steps": int(result.state.step), "test": test, "history": result.history}


if __name__ == "__main__":
    main()
