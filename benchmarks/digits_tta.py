"""W2: time to 98% test accuracy on the bundled digits, jnn vs raw JAX + optax vs scikit-learn.

Real data: `jnn.data.load_digits` (the train split left by the fixed 20% test split and a 10%
validation split). Every candidate trains the digits preset's model
(`digits_cnn` with 16-32 convolutions, dropout 0.25; no augmentation, which `jnn train` adds) with
AdamW 3e-3 and a 50-step warm-up cosine schedule over 500 steps, batch 64, batches drawn in the
same order per seed, evaluating the test accuracy every `EVAL_EVERY` steps until it reaches
`TARGET`. jnn and raw start every seed from the same parameters (jnn's initialisation for that
seed; their eval losses at step 0 are checked equal); they differ only in the dropout masks
(jnn folds the step into its key, the raw loop splits its own), so the steps to the target vary by
seed, not by framework. Timed per seed: the loop from the first step to the evaluation that reaches
the target (host batching, steps, evaluations); the compilation of the train and eval steps is
done once beforehand and reported apart. The seeds interleave the candidates (A B, B A, ...).
scikit-learn's `MLPClassifier` (one hidden layer of 128, Adam 1e-3, batch 64) is the peer a
scikit-learn user picks: `partial_fit` one epoch at a time, evaluated after each epoch, for up to
twice the JAX loops' step budget; its steps are its batches.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks import common
from benchmarks.loss_check import check_same_loss

TARGET = 0.98
EVAL_EVERY = 25
BATCH = 64
LR, WARMUP, DECAY_STEPS, WEIGHT_DECAY = 3e-3, 50, 500, 1e-4


def _optimizer():
    import optax

    return optax.adamw(optax.warmup_cosine_decay_schedule(0.0, LR, WARMUP, DECAY_STEPS), weight_decay=WEIGHT_DECAY)


class JnnLoop:
    """jnn's pieces as a user's loop uses them: create_train_state, make_train_step, make_eval_step."""

    def __init__(self, model, example):
        import jnn

        self.jnn, self.model, self.example = jnn, model, example
        # One optimizer for every seed: the state holds `tx` as a static field, so a new optax
        # object (even an equal chain) is a new jit cache key and the step compiles again.
        self.tx = _optimizer()
        self.step = jnn.jit(jnn.make_train_step("cross_entropy", metrics=("loss",), on_nonfinite="apply"), donate_argnums=0)
        self.eval = jnn.jit(jnn.make_eval_step("cross_entropy"))

    def init(self, seed):
        return self.jnn.create_train_state(self.model, self.tx, self.example, seed)

    def train(self, state, batch):
        return self.step(state, batch)[0]

    def evaluate(self, state, batch) -> tuple[float, float]:
        m = self.jnn.metrics.compute(self.eval(state, batch))
        return float(m["accuracy"]), float(m["loss"])


class RawLoop:
    """The same loop written with jax + optax only: (params, opt_state, key) tuples."""

    def __init__(self, model):
        import jax
        import jax.numpy as jnp
        import optax

        tx, loss = _optimizer(), optax.softmax_cross_entropy_with_integer_labels
        self.tx = tx

        def step(carry, batch):
            params, opt_state, key = carry
            key, dropout = jax.random.split(key)

            def compute_loss(p):
                logits = model.apply({"params": p}, batch["inputs"], train=True, rngs={"dropout": dropout})
                return loss(logits, batch["labels"]).mean()

            grads = jax.grad(compute_loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, key

        def evaluate(params, batch):
            logits = model.apply({"params": params}, batch["inputs"], train=False)
            return (jnp.mean(jnp.argmax(logits, -1) == batch["labels"]),
                    loss(logits, batch["labels"]).mean())

        self.step, self.eval = jax.jit(step, donate_argnums=0), jax.jit(evaluate)

    def init(self, params, seed):
        import jax

        params = jax.tree.map(lambda x: x.copy(), params)
        return params, self.tx.init(params), jax.random.key(seed)

    def train(self, carry, batch):
        return self.step(carry, batch)

    def evaluate(self, carry, batch) -> tuple[float, float]:
        accuracy, loss = self.eval(carry[0], batch)
        return float(accuracy), float(loss)


def batch_order(num: int, seed: int, steps: int) -> np.ndarray:
    """(steps, BATCH) example indices: a fresh permutation per epoch, the remainder dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = num // BATCH
    epochs = -(-steps // per_epoch)
    return np.concatenate([rng.permutation(num)[:per_epoch * BATCH] for _ in range(epochs)]).reshape(-1, BATCH)[:steps]


def train_to_target(loop, state, train, test, seed: int, max_steps: int) -> dict:
    order = batch_order(len(train["labels"]), seed, max_steps)
    start = time.perf_counter()
    accuracy, steps = 0.0, None
    for i, idx in enumerate(order, 1):
        state = loop.train(state, {"inputs": train["inputs"][idx], "labels": train["labels"][idx]})
        if i % EVAL_EVERY == 0:
            accuracy = loop.evaluate(state, test)[0]  # reads a float: waits for the step
            if accuracy >= TARGET:
                steps = i
                break
    return {"wall_s": time.perf_counter() - start, "steps": steps or len(order), "reached": steps is not None,
            "accuracy": accuracy}


def sklearn_to_target(train, test, seed: int, max_epochs: int) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = train["inputs"].reshape(len(train["inputs"]), -1), train["labels"]
    xt, yt = test["inputs"].reshape(len(test["inputs"]), -1), test["labels"]
    clf = MLPClassifier(hidden_layer_sizes=(128,), batch_size=BATCH, learning_rate_init=1e-3, random_state=seed)
    per_epoch = -(-len(y) // BATCH)
    start = time.perf_counter()
    accuracy, epoch = 0.0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for epoch in range(1, max_epochs + 1):
            clf.partial_fit(x, y, classes=np.arange(10))
            accuracy = float(np.mean(clf.predict(xt) == yt))
            if accuracy >= TARGET:
                break
    return {"wall_s": time.perf_counter() - start, "steps": epoch * per_epoch, "reached": accuracy >= TARGET,
            "accuracy": accuracy}


def measure(args, skipped: list[str]) -> dict:
    import importlib.util

    import jax

    import jnn

    t0 = time.perf_counter()
    splits = jnn.data.load_digits(val_fraction=0.1, seed=0)
    train, test = splits.split("train"), splits.split("test")
    model = jnn.models.get("digits_cnn", features=(16, 32))
    print(f"W2: digits to {TARGET:.0%} test accuracy, {len(train['labels'])} train / {len(test['labels'])} test "
          f"images, {args.seeds} seeds", flush=True)
    loops = {"jnn": JnnLoop(model, train["inputs"][:1]), "raw": RawLoop(model)}
    test_batch = jax.device_put(dict(test))
    # Compile both loops' steps on a throw-away state (reported apart), and check that they agree.
    compile_s, losses = {}, {}
    for name, loop in loops.items():
        state = loops["jnn"].init(0)
        state = state if name == "jnn" else loop.init(state.params, 0)
        start = time.perf_counter()
        losses[name] = loop.evaluate(state, test_batch)[1]
        batch = {"inputs": train["inputs"][:BATCH], "labels": train["labels"][:BATCH]}
        jax.block_until_ready(loop.train(state, batch))
        compile_s[name] = time.perf_counter() - start
    check_same_loss(losses)
    runs: dict[str, list[dict]] = {name: [] for name in loops}
    peers = list(loops)
    if importlib.util.find_spec("sklearn") is None:
        skipped.append("W2: scikit-learn not installed: its MLPClassifier peer skipped")
    else:
        peers.append("sklearn")
        runs["sklearn"] = []
    skipped.append("W2: no PyTorch peer (the PyTorch peers time the steps of W1 and W3-W7)")
    for seed in range(args.seeds):
        for name in peers if seed % 2 == 0 else peers[::-1]:
            if name == "sklearn":
                per_epoch = len(train["labels"]) // BATCH
                runs[name].append(sklearn_to_target(train, test, seed, max_epochs=-(-2 * args.max_steps // per_epoch)))
                continue
            loop = loops[name]
            state = loops["jnn"].init(seed)  # both loops start from jnn's parameters for this seed
            state = state if name == "jnn" else loop.init(state.params, seed)
            jax.block_until_ready(state)
            runs[name].append(train_to_target(loop, state, train, test_batch, seed, args.max_steps))
        print(f"  seed {seed}: " + ", ".join(f"{k} {v[-1]['wall_s']:.2f} s / {v[-1]['steps']} steps "
                                              f"({v[-1]['accuracy']:.4f})" for k, v in runs.items()), flush=True)
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "wall_s": common.spread([r["wall_s"] for r in rs]),
            "steps": common.spread([r["steps"] for r in rs]),
            "ms_per_step": common.spread([1e3 * r["wall_s"] / r["steps"] for r in rs]),
            "reached": sum(r["reached"] for r in rs), "seeds": len(rs),
            "compile_s": compile_s.get(name),
        }
    per_seed = {k: [r["wall_s"] for r in v] for k, v in runs.items()}
    per_step = {k: [r["wall_s"] / r["steps"] for r in v] for k, v in runs.items()}
    ratios = {f"jnn / {b}": {"wall_to_target": common.ratio(per_seed, "jnn", b),
                             "per_step": common.ratio(per_step, "jnn", b)} for b in peers[1:]}
    return {"kind": "time_to_accuracy", "title": f"digits time to {TARGET:.0%} test accuracy", "target": TARGET,
            "eval_every": EVAL_EVERY, "batch_size": BATCH, "first_eval_losses": losses, "candidates": summary,
            "ratios": ratios, "compile_ratio": {"jnn / raw": compile_s["jnn"] / compile_s["raw"]}, "runs": runs,
            "seconds": time.perf_counter() - t0,
            "median_wall_s": {k: statistics.median(v) for k, v in per_seed.items()}}
