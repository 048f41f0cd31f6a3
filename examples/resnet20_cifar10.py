"""CIFAR ResNet-20 (He et al. 2016, option-A shortcuts): SGD 0.1 + Nesterov, weight decay 1e-4,
learning rate x0.1 at 50% and 75% of 64,000 steps, random crop + flip.

  python examples/resnet20_cifar10.py --data-dir ~/data/cifar-10-batches-py   # paper: 8.75% test error
  python examples/resnet20_cifar10.py --debug        # ResNet-8 (one block per stage), 8 steps of 16
  python examples/resnet20_cifar10.py --set train.steps=32000 --set 'optim.boundaries=(16000, 24000)'

Without --data-dir it trains on scikit-learn's bundled 8x8 digits, resized to 32x32x3. A long run
checkpoints as it goes: after a preemption, `jnn train --resume RUN_DIR` continues it bit for bit.
"""
from __future__ import annotations

import argparse

from jnn import cli, experiment

PRESET = "resnet20_cifar10"


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.add_run_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Trains the preset, evaluates its best checkpoint on the test split; returns the summary."""
    args = parse_args(argv)
    config = cli.config_from_args(PRESET, args)
    run_dir = args.run_dir or cli.default_run_dir(PRESET, args.debug)
    # One call does what `jnn train --preset resnet20_cifar10` does: data, model, optimizer, fit with
    # evaluation and checkpoints, then the per-class test report (printed).
    return experiment.train(config, run_dir)


if __name__ == "__main__":
    main()
