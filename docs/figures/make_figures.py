"""Makes the README's figures that do not come from a `jnn train` run directory.

  python docs/figures/make_figures.py   # writes docs/figures/confusion_100_classes.png

A 100-class problem (overlapping Gaussian clusters in 32 dimensions, 6,000 train / 2,000 test
points) trained with `jnn.fit`, evaluated with `jnn.make_eval_step(confusion=True)`, drawn with
`jnn.writers.plot_confusion`: what `jnn train` draws for a data set of 100 classes.
"""
import os

import flax.linen as nn
import numpy as np
import optax

import jnn

CLASSES, DIM = 100, 32


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(CLASSES)(nn.relu(nn.Dense(256)(x)))


def clusters(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((CLASSES, DIM)).astype(np.float32)
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    return {"inputs": centres[labels] + 1.6 * rng.standard_normal((n, DIM)).astype(np.float32), "labels": labels}


def main() -> None:
    train, test = clusters(6000, 1), clusters(2000, 2)
    state = jnn.create_train_state(MLP(), optax.adam(3e-3), train["inputs"][:1], 0)
    result = jnn.fit(state, jnn.data.Pipeline(train, 128, seed=0), num_steps=300, loss_fn="cross_entropy",
                     progress=False)
    eval_step = jnn.jit(jnn.make_eval_step("cross_entropy", confusion=True))
    report = jnn.evaluate(result.state, jnn.data.Pipeline(test, 500, train=False), eval_step)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "confusion_100_classes.png")
    jnn.writers.plot_confusion(report["confusion"], path, [f"c{i}" for i in range(CLASSES)])
    print(f"test accuracy {report['accuracy']:.4f}; wrote {path}")


if __name__ == "__main__":
    main()
