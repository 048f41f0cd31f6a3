"""Int8 post-training quantization and quantization-aware training of the digits CNN (qwix).

  python examples/int8.py            # 400 steps float, then int8 PTQ; 400 steps QAT, then int8
  python examples/int8.py --debug    # a few steps: the code path only

Prints, for the float model and its int8 version (int8 weights with per-channel scales, int8
activations), and for a model trained with int8 fake quantization then converted: the test
accuracy (and its change from the float model), the largest logit difference to the model it was
converted from (for QAT: the fake-quantized model as trained), and the parameters' size in bytes,
computed from the arrays.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from jnn import cli

    return cli.add_demo_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), 400).parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    import numpy as np
    import optax

    import jnn
    from jnn import data, quantize

    splits = data.load("digits", val_fraction=0.1, seed=0)
    x, y = splits.test["inputs"], splits.test["labels"]
    steps = 4 if args.debug else args.steps

    def train(model):
        state = jnn.create_train_state(model, optax.adam(1e-3), splits.train["inputs"][:1], args.seed)
        return jnn.fit(state, data.Pipeline(splits.train, 64, seed=args.seed), num_steps=steps,
                       loss_fn="cross_entropy", progress=False).state

    model = jnn.models.get("digits_cnn", num_classes=splits.num_classes)
    float_state = train(model)
    float_logits = np.asarray(float_state.apply_fn(float_state.variables, x, train=False))
    accuracy = lambda logits: float((logits.argmax(-1) == y).mean())  # noqa: E731
    rows = [{"model": "float32", "test_accuracy": accuracy(float_logits), "max_logit_diff": 0.0,
             "bytes": quantize.nbytes(float_state.params)}]
    for name, state in (("int8 PTQ", float_state), ("QAT -> int8", train(quantize.qat(model)))):
        q = quantize.ptq(state)
        logits = np.asarray(q(x))
        reference = np.asarray(state.apply_fn(state.variables, x, train=False))  # the model it came from
        rows.append({"model": name, "test_accuracy": accuracy(logits),
                     "max_logit_diff": float(np.abs(logits - reference).max()), "bytes": q.nbytes})
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a text table; the change is against the first (float) row."""
    header = f"{'model':12s} {'test acc':>8s} {'change':>7s} {'max |logit diff|':>16s} {'bytes':>9s}"
    return "\n".join([header] + [
        f"{r['model']:12s} {r['test_accuracy']:8.4f} {r['test_accuracy'] - rows[0]['test_accuracy']:+7.4f} "
        f"{r['max_logit_diff']:16.3f} {r['bytes']:9,d}" for r in rows])


def main(argv=None) -> list[dict]:
    rows = run(parse_args(argv))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
