"""Transfer learning: pretrain a CNN on classes 0-4, fine-tune its dense layers on all ten with the
convolutions frozen, then print the per-class precision/recall/F1 report.

  python examples/cnn_finetune.py --data-dir ~/data/cifar-10-batches-py   # 4,000 + 4,000 steps
  python examples/cnn_finetune.py --debug                                 # 8 + 8 steps, in seconds
  python examples/cnn_finetune.py --finetune-steps 1000 --set optim.learning_rate=3e-4
  python examples/cnn_finetune.py --variant lora       # LoRA adapters (rank 4) instead of freezing
  python examples/cnn_finetune.py --variant few-shot   # 10 labelled examples of each of 5-9, vs scratch

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
transfer to the other half. `--variant lora` fine-tunes through rank-4 LoRA adapters on every
kernel (`jnn.lora`: the pretrained weights stay frozen, the optimizer holds the adapters' moments
only; the head is new so it trains in full); `--variant few-shot` fine-tunes on only
`--shots` (10) train examples of each of the classes 5-9 and trains the same model from scratch
on the same examples; both are tested on classes 5-9, to show what pretraining on 0-4 is worth
when labels are scarce. Without --data-dir the data are the bundled 8x8 digits, resized to
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
    p.add_argument("--variant", choices=("frozen", "lora", "few-shot"), default="frozen",
                   help="frozen convolutions (default), LoRA adapters, or few-shot with a from-scratch baseline")
    p.add_argument("--shots", type=int, default=10, help="few-shot: labelled train examples per class")
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
    train_data, train_count = exp.train_data, len(splits.train["labels"])
    if args.variant == "few-shot":  # `shots` examples of each new class (5-9), the same for both models
        rng = np.random.default_rng(config.data.seed)
        idx = np.concatenate([rng.choice(np.flatnonzero(splits.train["labels"] == c), args.shots, replace=False)
                              for c in range(PRETRAIN_CLASSES, splits.num_classes)])
        few = {k: v[idx] for k, v in splits.train.items()}
        train_data, train_count = exp.pipeline(few, batch_size=min(config.data.batch_size, len(idx))), len(idx)
    frozen = FROZEN if args.variant != "lora" else ()
    optim = dataclasses.replace(config.optim, frozen=frozen, total_steps=config.optim.total_steps or steps)
    tx = jnn.make_optimizer(optim)  # the preset's optimizer, with frozen parameters' updates set to zero
    params_before = flatten_dict(jax.device_get(pretrained.params), sep="/")  # a host copy: fit donates the state
    # A fresh optimizer (state and step count) on the pretrained parameters.
    state = pretrained.replace(step=jnp.zeros((), jnp.int32), tx=tx, opt_state=jax.jit(tx.init)(pretrained.params))
    if args.variant == "lora":  # adapters on the pretrained kernels; the 10-way head is new: train it in full
        lora = jnn.lora.LoRA(rank=4, alpha=8.0, targets=("^conv_.*kernel$", "^dense_0/kernel$"), train_base=("^head/",))
        state = jnn.lora.apply(state, lora, tx)
        labels = {k: "frozen" for k in params_before if not k.startswith("head/")}
        print(f"2. fine-tuning through LoRA adapters (rank 4) and the new head: {jnn.lora.trainable_count(state):,} "
              f"trainable parameters instead of {sum(v.size for v in params_before.values()):,}")
    else:
        labels = flatten_dict(jnn.optim.freeze_labels(pretrained.params, FROZEN), sep="/")  # {"conv_0/bias": "frozen"}
        print(f"2. fine-tuning on {train_count} train examples; {FROZEN} freezes "
              f"{sorted(k for k, v in labels.items() if v == 'frozen')}")
    tuned = run(state, train_data, lambda: exp.eval_data("val"), steps, "finetune").state
    after = jnn.evaluate(tuned, exp.eval_data("test"), eval_step)

    tuned_params = tuned.params["base"] if args.variant == "lora" else tuned.params
    params_after = flatten_dict(jax.device_get(tuned_params), sep="/")
    unchanged = all(np.array_equal(params_before[k], params_after[k]) for k, v in labels.items() if v == "frozen")
    print(jnn.metrics.format_report(after["report"], splits.class_names))
    print(f"test accuracy: {before['accuracy']:.4f} after pretraining on 0-{PRETRAIN_CLASSES - 1}, "
          f"{after['accuracy']:.4f} after fine-tuning ({args.variant}); "
          f"{'convolutions' if args.variant != 'lora' else 'frozen weights'} unchanged: {unchanged}")
    summary = {"run_dir": run_dir, "before": before, "after": after, "frozen_unchanged": unchanged,
               "class_names": splits.class_names, "variant": args.variant}
    if args.variant == "few-shot":  # the same model and examples, from a random initialisation
        scratch_state = jnn.create_train_state(experiment.build_model(config, splits), jnn.make_optimizer(
            dataclasses.replace(optim, frozen=())), splits.train["inputs"][:1], t.seed + 1)
        scratch = run(scratch_state, train_data, lambda: exp.eval_data("val"), steps, "scratch").state
        new = {k: v[splits.test["labels"] >= PRETRAIN_CLASSES] for k, v in splits.test.items()}
        new_test = lambda: exp.pipeline(new, train=False)  # noqa: E731 - the classes seen only in fine-tuning
        summary["after_new"] = jnn.evaluate(tuned, new_test(), eval_step)
        summary["scratch"] = jnn.evaluate(scratch, new_test(), eval_step)
        print(f"test accuracy on classes {PRETRAIN_CLASSES}-{splits.num_classes - 1} after {args.shots} labelled "
              f"examples of each: {summary['after_new']['accuracy']:.4f} fine-tuned from the 0-{PRETRAIN_CLASSES - 1} "
              f"model, {summary['scratch']['accuracy']:.4f} trained from scratch on the same {train_count} examples")
    return summary


if __name__ == "__main__":
    main()
