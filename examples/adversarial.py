"""Standard vs adversarial training of the digits CNN, both evaluated clean and under attack.

  python examples/adversarial.py            # 400 steps each, PGD-7 training, PGD-20 / FGSM test
  python examples/adversarial.py --debug    # a few steps: the code path only

Adversarial training (Madry et al. 2018) trains on PGD examples within an L-inf ball of radius
epsilon around each image (pixels in [0, 1]); `--mix 0.5` replaces half of each batch only. The
table prints clean, FGSM and PGD-20 test accuracy for both models, as measured.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="a few steps")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--epsilon", type=float, default=0.1, help="L-inf radius, in pixel units of [0, 1]")
    p.add_argument("--mix", type=float, default=1.0, help="fraction of each batch made adversarial")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    import jax
    import optax

    import jnn
    from jnn import adversarial, data

    splits = data.load("digits", val_fraction=0.1, seed=0)
    steps = 4 if args.debug else args.steps
    train_attack = adversarial.PGD(args.epsilon, steps=2 if args.debug else 7)
    tests = {"clean": None, "FGSM": adversarial.fgsm(args.epsilon),
             "PGD-20": adversarial.PGD(args.epsilon, steps=2 if args.debug else 20)}
    rows = []
    for name, attack in (("standard", None), ("adversarial", train_attack)):
        state = jnn.create_train_state(jnn.models.get("digits_cnn", num_classes=10), optax.adam(1e-3),
                                       splits.train["inputs"][:1], args.seed)
        step = jnn.make_train_step("cross_entropy") if attack is None else \
            adversarial.make_adversarial_train_step("cross_entropy", attack, mix=args.mix)
        result = jnn.fit(state, data.Pipeline(splits.train, 64, seed=args.seed), num_steps=steps,
                         train_step=jax.jit(step, donate_argnums=0), progress=False)
        row = {"training": name}
        for test_name, test_attack in tests.items():
            evaluation = jax.jit(jnn.make_eval_step("cross_entropy")) if test_attack is None else \
                jax.jit(adversarial.make_robust_eval_step("cross_entropy", test_attack))
            row[test_name] = jnn.evaluate(result.state, data.Pipeline(splits.test, 256, train=False),
                                          evaluation)["accuracy"]
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = run(args)
    print(f"test accuracy on the digits, L-inf epsilon {args.epsilon} (pixels in [0, 1])")
    print(f"{'training':12s} {'clean':>7s} {'FGSM':>7s} {'PGD-20':>7s}")
    for r in rows:
        print(f"{r['training']:12s} {r['clean']:7.4f} {r['FGSM']:7.4f} {r['PGD-20']:7.4f}")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
