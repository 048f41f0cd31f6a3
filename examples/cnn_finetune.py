"""Transfer learning: pretrain a CNN on classes 0-4, fine-tune its dense layers on all ten with the
convolutions frozen, then print the per-class precision/recall/F1 report.

  python examples/cnn_finetune.py --data-dir ~/data/cifar-10-batches-py   # 4,000 + 4,000 steps
  python examples/cnn_finetune.py --debug                                 # 8 + 8 steps, in seconds
  python examples/cnn_finetune.py --finetune-steps 1000 --set optim.learning_rate=3e-4

The model is the `cnn_cifar10` preset's CNN from PyTorch's fine-tuning example (conv32-pool-conv64-
pool-128-10, log-softmax output, NLL loss); its parameters are `conv_0`, `conv_1`, `dense_0` and
`head` (`jax.tree_util.tree_map(jnp.shape, state.params)` prints the tree). Offline, with one data
set, the honest split of "pretraining task" and "target task" is by class:

  1. pretrain every layer on the train examples of classes 0-4 only (validated on val's 0-4);
  2. fine-tune on all ten classes with `OptimConfig(frozen=("^conv_",))`: the convolutions keep the
     features learned on 0-4, and only `dense_0` and `head` are trained, on 5-9 for the first time;
  3. evaluate on the whole test split before (at most ~50%: the model never saw a 5-9 label) and
     after, and print the per-class report.

How far the fine-tune gets on classes 5-9 measures how well features learned on half the classes
transfer to the other half. Without --data-dir the data are the bundled 8x8 digits, resized to
32x32x3 (the classes are then the digits 0-9).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

import jnn
from jnn import cli, experiment

PRESET = "cnn_cifar10"
PRETRAIN_CLASSES = 5  # pretrain on classes [0, 5)
FROZEN = ("^conv_",)  # regexes on "/"-joined parameter paths, e.g. "conv_0/kernel"


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.add_run_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tune steps (default: train.steps)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Pretrains, fine-tunes, prints before/after accuracy and the report; returns them."""
    args = parse_args(argv)
    config = cli.config_from_args(PRESET, args)
    run_dir = args.run_dir or os.path.join("runs", f"finetune{'-debug' * args.debug}-{time.strftime('%Y%m%d-%H%M%S')}")
    exp = experiment.build(config)
    if exp.note:
        print("note:", exp.note)
    splits, t = exp.splits, config.train
    # Pipelines over the classes 0-4, with the run's own preprocessing (train-split normalisation).
    first = {s: {k: v[splits.split(s)["labels"] < PRETRAIN_CLASSES] for k, v in splits.split(s).items()}
             for s in ("train", "val")}
    pretrain_data, pretrain_val = exp.pipeline(first["train"]), exp.pipeline(first["val"], train=False)
    eval_step = jax.jit(jnn.make_eval_step(exp.loss_fn, confusion=True))  # one compile for every evaluation

    def run(state, data, eval_data, steps, name):
        with jnn.writers.make_run_writers(os.path.join(run_dir, name), console=True) as writer:  # <run_dir>/<name>/
            return jnn.fit(state, data, num_steps=steps, loss_fn=exp.loss_fn, eval_step=eval_step,
                           eval_data=eval_data, eval_every=t.eval_every, log_every=t.log_every, writer=writer)

    print(f"1. pretraining on the {len(first['train']['labels'])} train examples of classes 0-{PRETRAIN_CLASSES - 1}")
    pretrained = run(exp.state, pretrain_data, pretrain_val, t.steps, "pretrain").state
    before = jnn.evaluate(pretrained, exp.eval_data("test"), eval_step)

    steps = args.finetune_steps or t.steps
    optim = dataclasses.replace(config.optim, frozen=FROZEN, total_steps=config.optim.total_steps or steps)
    tx = jnn.make_optimizer(optim)  # the preset's optimizer, with frozen parameters' updates set to zero
    labels = flatten_dict(jnn.optim.freeze_labels(pretrained.params, FROZEN), sep="/")  # {"conv_0/bias": "frozen", ...}
    params_before = flatten_dict(jax.device_get(pretrained.params), sep="/")  # a host copy: fit donates the state
    # A fresh optimizer (state and step count) on the pretrained parameters.
    state = pretrained.replace(step=jnp.zeros((), jnp.int32), tx=tx, opt_state=jax.jit(tx.init)(pretrained.params))
    print(f"2. fine-tuning on all {len(splits.train['labels'])} train examples; {FROZEN} freezes "
          f"{sorted(k for k, v in labels.items() if v == 'frozen')}")
    tuned = run(state, exp.train_data, lambda: exp.eval_data("val"), steps, "finetune").state
    after = jnn.evaluate(tuned, exp.eval_data("test"), eval_step)

    params_after = flatten_dict(jax.device_get(tuned.params), sep="/")
    unchanged = all(np.array_equal(params_before[k], params_after[k]) for k, v in labels.items() if v == "frozen")
    print(jnn.metrics.format_report(after["report"], splits.class_names))
    print(f"test accuracy: {before['accuracy']:.4f} after pretraining on 0-{PRETRAIN_CLASSES - 1}, "
          f"{after['accuracy']:.4f} after fine-tuning; convolutions unchanged: {unchanged}")
    return {"run_dir": run_dir, "before": before, "after": after, "frozen_unchanged": unchanged,
            "class_names": splits.class_names}


if __name__ == "__main__":
    main()
