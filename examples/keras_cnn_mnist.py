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
import dataclasses
import os
import time

from jnn import config as config_lib
from jnn import experiment, presets

PRESET = "keras_cnn_mnist"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="MNIST IDX files (default: the bundled digits, resized)")
    p.add_argument("--debug", action="store_true", help="the preset's tiny variant: 8 steps of 16 examples")
    p.add_argument("--run-dir", default=None, help="where to write the run (default: runs/<preset>-<time>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. optim.learning_rate=3e-4 (repeatable)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> config_lib.Config:
    """The preset (or its debug variant), its data directory, then the --set overrides."""
    config = presets.get(PRESET, debug=args.debug)
    if args.data_dir:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=args.data_dir))
    return config_lib.override(config, args.set)


def main(argv=None) -> dict:
    """Trains the preset, evaluates its best checkpoint on the test split; returns the summary."""
    args = parse_args(argv)
    config = make_config(args)
    run_dir = args.run_dir or os.path.join("runs", f"{PRESET}{'-debug' * args.debug}-{time.strftime('%Y%m%d-%H%M%S')}")
    # One call does what `jnn train --preset keras_cnn_mnist` does: data, model, optimizer, fit with
    # evaluation and checkpoints, then the per-class test report (printed).
    return experiment.train(config, run_dir)


if __name__ == "__main__":
    main()
