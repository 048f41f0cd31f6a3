"""The Keras MNIST CNN (conv32-pool-conv64-pool-512-10, Keras initialisers) with Adam 1e-3.

  python examples/keras_cnn_mnist.py --data-dir ~/data/mnist   # full run: 2,000 steps of 128
  python examples/keras_cnn_mnist.py --debug                   # 8 steps of 16, in seconds
  python examples/keras_cnn_mnist.py --set train.steps=5000 --set optim.learning_rate=5e-4

Without --data-dir it trains on scikit-learn's bundled 8x8 digits, resized to 28x28 (no download).
The run directory holds config.json, metrics.jsonl, tb/, curves.png, checkpoints/ and
test_metrics.json; `jnn eval RUN_DIR` re-evaluates its best checkpoint.
"""
from __future__ import annotations

import argparse

from jnn import cli, experiment

PRESET = "keras_cnn_mnist"


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.add_run_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Trains the preset, evaluates its best checkpoint on the test split; returns the summary."""
    args = parse_args(argv)
    config = cli.config_from_args(PRESET, args)
    run_dir = args.run_dir or cli.default_run_dir(PRESET, args.debug)
    # One call does what `jnn train --preset keras_cnn_mnist` does: data, model, optimizer, fit with
    # evaluation and checkpoints, then the per-class test report (printed).
    return experiment.train(config, run_dir)


if __name__ == "__main__":
    main()
