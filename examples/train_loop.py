"""The whole training loop written out with jnn's pieces, as flax's examples/mnist/train.py does.

  python examples/train_loop.py                     # a small CNN on the bundled digits, 500 steps
  python examples/train_loop.py --nnx               # the same CNN written with flax.nnx
  python examples/train_loop.py --debug             # a few steps, in seconds
  python examples/train_loop.py --set train.steps=1000 --set optim.learning_rate=1e-3

`jnn train` does all of this in one command; this script shows the parts, for a research loop that
needs to change one of them: your own model (linen or nnx), `create_train_state`, a jitted
`make_train_step` that skips non-finite steps, a resumable `Pipeline`, a jitted eval step whose
accumulators are merged on the device and read once, and orbax checkpoints. The numbers (steps,
batch size, optimizer, seed) come from the `digits` preset, so `--set` works as for `jnn train`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import flax.linen as nn
import jax
from flax import nnx

import jnn
from jnn import cli


class CNN(nn.Module):
    """(B, 8, 8, 1) -> (B, 10): conv 16 - conv 32 - dense, dropout in training."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.Dropout(0.1, deterministic=not train)(x.reshape(len(x), -1))
        return nn.Dense(10)(x)


class NnxCNN(nnx.Module):
    """The same network in flax.nnx: jnn switches it with .train() / .eval() inside the step."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(8 * 8 * 32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(self.dropout(x.reshape(len(x), -1)))


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.add_run_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--nnx", action="store_true", help="train the flax.nnx version of the model")
    return p.parse_args(argv)


def evaluate(state, eval_step, split, batch_size) -> dict:
    """Sums the eval step's accumulators over the split on the device; reads them once."""
    totals = None
    for batch in jnn.data.Pipeline(split, batch_size, train=False):
        totals = jnn.metrics.merge(totals, eval_step(state, jnn.pad_batch(batch, batch_size)))
    return jnn.metrics.compute(totals)


def main(argv=None) -> dict:
    """Trains, evaluates on validation every `eval_every` steps with a checkpoint, then tests."""
    args = parse_args(argv)
    config = cli.config_from_args("digits", args)
    t, d = config.train, config.data
    run_dir = args.run_dir or cli.default_run_dir("train_loop", args.debug)
    splits = jnn.data.load("digits", val_fraction=d.val_fraction, seed=d.seed)
    x = splits.train["inputs"]  # (N, 8, 8, 1) float32

    model = NnxCNN(nnx.Rngs(t.seed)) if args.nnx else CNN()
    # The schedule runs over the whole training (warm-up, then cosine decay to the end).
    optim = dataclasses.replace(config.optim, total_steps=config.optim.total_steps or t.steps)
    state = jnn.create_train_state(model, jnn.make_optimizer(optim), x[:1], t.seed)
    train_step = jax.jit(jnn.make_train_step("cross_entropy", on_nonfinite="skip"), donate_argnums=0)
    eval_step = jax.jit(jnn.make_eval_step("cross_entropy", confusion=True))
    batches = iter(jnn.data.Pipeline(splits.train, d.batch_size, seed=d.seed,
                                     augment=[jnn.data.RandomCrop(padding=d.crop_padding)]))
    history = []
    with jnn.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=1, best_metric="accuracy") as ckpt:
        for step in range(1, t.steps + 1):
            state, metrics = train_step(state, next(batches))
            if step % t.log_every == 0 or step == t.steps:  # the only host syncs: logging and eval
                history.append({"step": step, "split": "train", **jax.device_get(metrics)})
                print(f"step {step}: loss {float(metrics['loss']):.4f}, accuracy {float(metrics['accuracy']):.4f}")
            if step % t.eval_every == 0 or step == t.steps:
                val = evaluate(state, eval_step, splits.val, d.eval_batch_size)
                history.append({"step": step, "split": "eval", "loss": val["loss"], "accuracy": val["accuracy"]})
                print(f"step {step}: validation accuracy {val['accuracy']:.4f}")
                ckpt.save(state, data_state=batches.get_state(), metrics={"accuracy": val["accuracy"]})
        best, _ = ckpt.restore(state, step=ckpt.best_step())
    test = evaluate(best, eval_step, splits.test, d.eval_batch_size)
    print(jnn.metrics.format_report(jnn.metrics.classification_report(test["confusion"])))
    print(f"test accuracy {test['accuracy']:.4f} (best checkpoint, step {int(best.step)})")
    return {"run_dir": run_dir, "steps": int(state.step), "test": test, "history": history,
            "model": "nnx" if args.nnx else "linen"}


if __name__ == "__main__":
    main()
