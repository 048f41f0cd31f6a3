"""The checks `check_model` runs, each a function of a `Case` that returns a one-line summary,
raises `NotApplicable` (the model has nothing the check looks at) or `ModelCheckError`."""
from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jnn import metrics as metrics_lib
from jnn.testing._case import Case, take
from jnn.testing._randomness import random_draws
from jnn.testing._report import Failure, ModelCheckError, compare_trees, first_nonfinite, path_str
from jnn.train.step import resolve_loss

PyTree = Any


class NotApplicable(Exception):
    """The model has nothing this check looks at (e.g. no batch statistics); the message says why."""


def _fail(check: str, summary: str, **fields: str) -> ModelCheckError:
    return ModelCheckError(Failure(check, summary, **fields))


def _mismatch_error(check: str, summary: str, mismatch, expected_label: str, got_label: str, *, cause: str,
                    fix: str) -> ModelCheckError:
    return _fail(check, summary, where=mismatch.where, expected=f"{mismatch.expected} ({expected_label})",
                 got=f"{mismatch.got} ({got_label}); {mismatch.detail}", cause=cause, fix=fix)


def _batched(tree: PyTree, like: PyTree, size: int) -> PyTree:
    """The leaves of an output tree whose counterpart in `like` has a leading batch axis of `size`
    (others, e.g. an auxiliary scalar, are not per-example); the rest become None."""
    return jax.tree.map(lambda x, y: x if np.ndim(y) >= 1 and np.shape(y)[0] == size else None, tree, like)


# ----------------------------------------------------------------------------------------------


def output_shapes(case: Case) -> str:
    """Outputs have a leading batch axis, the same shapes and dtypes in training and evaluation,
    and (given `output_shapes=`, per-example shapes) the expected shapes."""
    name, expected = "output_shapes", case.output_shapes
    eval_out = case.outputs(case.inputs, train=False)
    train_out = case.outputs(case.inputs, train=True)
    leaves = jax.tree_util.tree_leaves_with_path(eval_out)
    if not any(case.is_batched(x) for _, x in leaves):
        shapes = {path_str("outputs", p): np.shape(x) for p, x in leaves}
        raise _fail(name, "no output has a leading batch axis.", where="outputs",
                    expected=f"shapes (B, ...) with B = {case.size}", got=str(shapes),
                    cause="the model reduces over the batch (a mean or sum over axis 0) or flattens it away",
                    fix="return one output per example; reduce over the batch in the loss instead")
    spec = lambda t: jax.tree.map(lambda x: (np.shape(x), str(np.asarray(x).dtype)), t)  # noqa: E731
    if jax.tree.structure(eval_out) != jax.tree.structure(train_out) or spec(eval_out) != spec(train_out):
        mismatch = compare_trees(spec(eval_out), spec(train_out), "outputs", rtol=0, atol=0)
        raise _fail(name, "the outputs differ in shape or dtype between training and evaluation.",
                    where=getattr(mismatch, "where", "outputs"), expected=f"{spec(eval_out)} (eval mode)",
                    got=f"{spec(train_out)} (train mode)",
                    cause="a branch on the train flag that returns something else",
                    fix="return the same structure in both modes")
    if expected is not None:
        want = jax.tree.map(lambda s: (case.size, *s), expected, is_leaf=lambda s: isinstance(s, tuple))
        try:
            chex.assert_trees_all_equal_shapes(eval_out, jax.tree.map(np.zeros, want,
                                                                      is_leaf=lambda s: isinstance(s, tuple)))
        except AssertionError as err:
            raise _fail(name, "the outputs do not have the expected shapes.", where="outputs",
                        expected=str(want), got=str(jax.tree.map(np.shape, eval_out)), cause=str(err).splitlines()[0],
                        fix="fix the model's head, or the expected shapes") from None
    return f"outputs {jax.tree.map(np.shape, eval_out)}, the same in training and evaluation"


def finite(case: Case) -> str:
    """The initial parameters, outputs, loss, gradients and the state after a step are all finite."""
    name = "finite"
    new_state, metrics = case.stepped
    stages = [
        ("params", case.state.params, "the initialiser produced NaN or Inf",
         "check the custom initialiser (e.g. a variance scale divided by a zero fan-in)"),
        ("outputs (train mode)", case.outputs(case.inputs, train=True),
         "the forward pass overflows or divides by zero: log(0), sqrt or a power of a negative number, x / 0, "
         "exp of a large value, a normalisation by a zero norm or variance",
         "add an epsilon (x / (norm + 1e-6)), use jax.nn.log_softmax / logsumexp instead of log(softmax), clip"),
        ("metrics", metrics, "the loss is log of 0 or of a negative number (log(softmax(x)) instead of "
         "log_softmax), or labels the loss cannot take",
         "compute the loss from logits with jnn.losses / optax, which are stable"),
        ("gradient of params", case.step_grads,
         "a function whose value is finite but whose derivative is not at the point reached: sqrt(0), "
         "jnp.linalg.norm of a zero vector, log near 0, x / max(norm, eps) (max does not stop the inner NaN)",
         "use the double-where trick (jnp.where(x > 0, x, 1) inside, then where outside) or add an epsilon "
         "inside the sqrt: jnp.sqrt(jnp.sum(x ** 2) + 1e-12)"),
        ("params (after one step)", new_state.params, "the update made the parameters non-finite",
         "lower the learning rate; check a custom optimizer or update"),
        ("opt_state (after one step)", new_state.opt_state, "the optimizer state became non-finite",
         "check the gradients (above) and the optimizer's hyperparameters"),
        ("model_state (after one step)", new_state.model_state,
         "the state update divides by zero (a variance with ddof on a batch of one, a count of zero)",
         "guard the update with an epsilon"),
        ("outputs (eval mode)", case.outputs(case.inputs, train=False),
         "evaluation reads a non-finite running statistic or divides by zero",
         "check the running statistics' update and the eval branch"),
    ]
    for stage, tree, cause, fix in stages:
        found = first_nonfinite(tree, stage.split(" (")[0])
        if found is not None:
            where, value, count, size = found
            raise _fail(name, f"a non-finite value in the {stage}.", where=where, expected="a finite value",
                        got=f"{value} ({count} of {size} elements of this array are NaN or Inf)", cause=cause,
                        fix=fix)
    return "parameters, outputs, loss, gradients and the state after a step are finite"


def jit_matches_eager(case: Case) -> str:
    """The compiled step equals the step run op by op: params, opt_state, model_state, metrics."""
    name = "jit_matches_eager"
    eager_state, eager_metrics = jax.device_get(case.step(case.state, case.batch))
    jit_state, jit_metrics = case.stepped
    rtol, atol = case.reorder_tolerance
    for prefix, a, b in (("params", eager_state.params, jit_state.params),
                         ("opt_state", eager_state.opt_state, jit_state.opt_state),
                         ("model_state", eager_state.model_state, jit_state.model_state),
                         ("loss_scale", eager_state.loss_scale, jit_state.loss_scale),
                         ("metrics", eager_metrics, jit_metrics)):
        mismatch = compare_trees(a, b, prefix, rtol=rtol, atol=atol)
        if mismatch is not None:
            raise _mismatch_error(
                name, "the compiled train step and the same step run op by op disagree.", mismatch,
                "op by op", "jax.jit",
                cause="the model's Python code behaves differently when traced: numpy randomness or a Python "
                      "value computed once at trace time (np.random, time, a global counter), a branch on "
                      "isinstance(x, jax.core.Tracer), or state kept on the module object instead of in a variable",
                fix="draw randomness with self.make_rng / nnx.Rngs, keep state in flax variables "
                    "(self.variable / nnx.Variable), and compute everything with jax.numpy")
    return f"params, opt_state, model_state and metrics within rtol {rtol:g}, atol {atol:g}"


def _signature(tree: PyTree) -> dict[str, tuple]:
    def sig(x):
        x = x if hasattr(x, "dtype") else np.asarray(x)
        return tuple(np.shape(x)), str(x.dtype), bool(getattr(x, "weak_type", False))

    return {jax.tree_util.keystr(p): sig(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def no_retrace(case: Case, calls: int = 3) -> str:
    """The compiled step traces once over several steps with fresh batches of the same shape."""
    name = "no_retrace"
    step = case.train_step
    state = jax.tree.map(jnp.array, case.state)
    before = case.traces
    prev = None
    for i in range(calls):
        perm = np.random.default_rng(i).permutation(case.size)
        batch = {"inputs": take(case.inputs, perm), "labels": take(case.labels, perm)}
        args = {"state": state, "batch": batch}
        traces = case.traces
        state, _ = step(state, batch)
        if prev is not None and case.traces > traces:
            raise _retrace_error(name, prev, args, i)
        prev = args
    return f"{calls} steps with fresh batches, {case.traces - before} new trace(s) (one compilation in all)"


def _retrace_error(name: str, prev: dict, now: dict, i: int) -> ModelCheckError:
    cause = ("a variable whose dtype, shape or weak type the step changes: a bfloat16 statistic updated with "
             "float32 values, a counter initialised from a Python number (weakly typed) and updated with a "
             "strongly typed one, a collection that grows")
    fix = ("keep every variable's dtype and shape fixed: cast updates to the variable's dtype "
           "(new.astype(old.dtype)) and initialise with an explicit dtype (jnp.zeros((), jnp.int32))")
    if jax.tree.structure(prev["state"]) != jax.tree.structure(now["state"]):
        return _fail(name, f"the step re-traced at call {i + 1}: the state's structure changed.", where="state",
                     expected=str(jax.tree.structure(prev["state"]))[:400],
                     got=str(jax.tree.structure(now["state"]))[:400], cause=cause, fix=fix)
    a, b = _signature(prev), _signature(now)
    for key in a:
        if a[key] != b.get(key):
            (shape0, dtype0, weak0), (shape1, dtype1, weak1) = a[key], b[key]
            return _fail(name, f"the step re-traced at call {i + 1}: an argument changed its type.",
                         where=key.replace("['state']", "state").replace("['batch']", "batch"),
                         expected=f"shape {shape0}, dtype {dtype0}{', weakly typed' if weak0 else ''} (call {i})",
                         got=f"shape {shape1}, dtype {dtype1}{', weakly typed' if weak1 else ''} (call {i + 1})",
                         cause=cause, fix=fix)
    return _fail(name, f"the step re-traced at call {i + 1}, with arguments of the same shapes and dtypes.",
                 cause="a static part of the step changed (the model, optimizer or spec held by the state) or "
                       "the step closes over a Python value that changes",
                 fix="keep static configuration fixed between steps")


def gradients(case: Case) -> str:
    from jnn.testing import _gradients  # noqa: PLC0415

    return _gradients.check(case)


def eval_deterministic(case: Case) -> str:
    """Evaluation does not depend on the step's key: no dropout or noise in eval mode."""
    name = "eval_deterministic"
    a = case.outputs(case.inputs, train=False, rng=jax.random.key(1))
    b = case.outputs(case.inputs, train=False, rng=jax.random.key(2))
    mismatch = compare_trees(a, b, "outputs", rtol=0.0, atol=0.0)
    if mismatch is not None:
        raise _mismatch_error(
            name, "the eval-mode outputs change with the step's random key.", mismatch, "key 1", "key 2",
            cause="dropout or noise stays on in evaluation: the mode flag does not reach the layer (e.g. "
                  "nn.Dropout(rate, deterministic=False) hard-coded, or a flag jnn cannot find)",
            fix="pass the flag through: nn.Dropout(rate, deterministic=not train), and give __call__ a `train` "
                "(or `deterministic`) keyword, or create_train_state(..., train_kwarg='my_flag')")
    return "eval outputs identical under two different step keys"


def eval_per_example(case: Case) -> str:
    """An example's eval output does not depend on the rest of its batch (halves, reversed order)."""
    name = "eval_per_example"
    rtol, atol = case.reorder_tolerance
    outputs = case.outputs(case.inputs, train=False)
    full = _batched(outputs, outputs, case.size)
    half = case.size // 2
    rev = np.arange(case.size)[::-1]
    for label, index in (("the batch's first half alone", slice(0, half)),
                         ("the batch's second half alone", slice(half, None)),
                         ("the batch reversed", rev)):
        part = _batched(case.outputs(take(case.inputs, index), train=False), outputs, case.size)
        want = jax.tree.map(lambda x: None if x is None else x[index], full)
        mismatch = compare_trees(want, part, "outputs", rtol=rtol, atol=atol)
        if mismatch is not None:
            raise _mismatch_error(
                name, f"an example's eval output depends on the other examples in its batch ({label}).",
                mismatch, "in the whole batch", label,
                cause="evaluation uses batch statistics (BatchNorm with use_running_average=False in eval, or its "
                      "mode flag wired backwards), or the model mixes examples (a mean over axis 0, attention "
                      "across the batch axis)",
                fix="nn.BatchNorm(use_running_average=not train); reduce over the feature axes, not axis 0")
    return "eval outputs per example: halves and reversed order agree with the whole batch"


def train_updates_state(case: Case) -> str:
    """Training moves every batch statistic the model declares."""
    name = "train_updates_state"
    old = case.state.model_state
    flags = case.state.model.batch_stats_flags(old)
    if not any(flags):
        raise NotApplicable("the model has no batch statistics")
    new = case.stepped[0].model_state
    leaves = jax.tree_util.tree_leaves_with_path(old)
    for (path, a), b, is_stat in zip(leaves, jax.tree.leaves(new), flags):
        if is_stat and np.array_equal(np.asarray(a), np.asarray(b)):
            raise _fail(name, "a batch statistic did not change in a training step.",
                        where=path_str("model_state", path), expected="new running statistics after a step",
                        got="the initial values, unchanged",
                        cause="BatchNorm normalises with its running averages in training (use_running_average=True "
                              "in train mode: the mode flag wired backwards or hard-coded), so it never updates them",
                        fix="nn.BatchNorm(use_running_average=not train) (nnx: nnx.BatchNorm follows "
                            ".train()/.eval(); do not pass use_running_average=True)")
    return f"{sum(flags)} batch statistic(s) updated by a training step"


def train_randomness(case: Case) -> str:
    """Training draws its random numbers from the step's key: a new mask every step, the same
    state and key give the same step."""
    name = "train_randomness"
    model, state = case.state.model, case.state

    def run(params, model_state, inputs, rng):
        return model.apply(params, model_state, inputs, train=True, rng=rng)[0]

    draws = random_draws(run, (state.params, state.model_state, case.inputs, jax.random.key(0)), 3)
    fixed = [d for d in draws if not d.keyed and d.shape[:1] == (case.size,)]
    if fixed:
        d = fixed[0]
        raise _fail(name, "the model draws per-example random numbers from a fixed key: the same mask every step.",
                    where=d.where, expected="a key derived from the step (self.make_rng('dropout'), nnx.Rngs)",
                    got=f"a draw of shape {d.shape} whose key does not depend on the step's key "
                        f"({len(fixed)} such draw(s))",
                    cause="jax.random.key(0) / PRNGKey(...) inside the model, a key stored on the module, or "
                          "nn.Dropout(...)(x, rng=fixed_key)",
                    fix="draw from self.make_rng('dropout') (linen) or the module's nnx.Rngs; jnn derives them "
                        "from the step: fold_in(state.key, step)")
    keyed = [d for d in draws if d.keyed]
    if not keyed:
        raise NotApplicable("the model draws no random numbers in training")
    a = case.outputs(case.inputs, train=True, rng=jax.random.key(1))
    b = case.outputs(case.inputs, train=True, rng=jax.random.key(2))
    if compare_trees(a, b, "outputs", rtol=0.0, atol=0.0) is None:
        raise _fail(name, "the training outputs are identical under two different step keys although the model "
                          "draws random numbers from the key.",
                    where=keyed[0].where, expected="different outputs (new dropout masks)",
                    got="identical outputs", cause="the random draws do not reach the output (a mask computed and "
                                                   "not applied, a rate of 0 applied through a random draw)",
                    fix="apply the mask; or remove the draw")
    again = jax.device_get(jax.jit(case.step)(case.state, case.batch))  # a fresh trace and compilation
    mismatch = compare_trees(case.stepped, again, "state", rtol=0.0, atol=0.0)
    if mismatch is not None:
        raise _mismatch_error(name, "the same state and batch give another step when compiled again.", mismatch,
                              "first compilation", "second compilation",
                              cause="randomness outside JAX's keys: numpy or Python random numbers drawn while tracing",
                              fix="draw every random number from a JAX key (self.make_rng / nnx.Rngs)")
    return f"{len(keyed)} random draw(s) from the step's key: new each step, reproducible"


def loss_per_example(case: Case) -> str:
    """In eval mode, a batch's loss equals the example-weighted mean of its halves' losses."""
    name = "loss_per_example"
    rtol, atol = case.reorder_tolerance
    half = case.size // 2

    def loss_of(index):
        sub = {"inputs": take(case.inputs, index), "labels": take(case.labels, index)}
        return case.eval_step(case.state, sub)["loss"]

    whole = float(metrics_lib.compute({"loss": loss_of(slice(None))})["loss"])
    first, second = loss_of(slice(0, half)), loss_of(slice(half, None))
    halves = float(metrics_lib.compute(metrics_lib.merge({"loss": first}, {"loss": second}))["loss"])
    if not abs(whole - halves) <= atol + rtol * abs(halves):
        outputs = case.outputs(case.inputs, train=False)
        shape = np.shape(resolve_loss(case.loss_fn)(jax.tree.map(jnp.asarray, outputs), case.labels, case.batch))
        broadcast = len(shape) >= 2 and shape[:2] == (case.size, case.size)
        raise _fail(name, "the batch's loss is not the example-weighted mean of its halves' losses: the loss "
                          "couples examples.", where=f"loss (per-example losses of shape {shape})",
                    expected=f"{halves:.7g} (the halves' losses, merged)", got=f"{whole:.7g} (the whole batch)",
                    cause=("a broadcast: outputs (B, 1) against labels (B,) give a (B, B) loss"
                           if broadcast else "a broadcast between outputs and labels of different ranks, or a "
                                             "normalisation by a batch statistic inside the loss"),
                    fix="squeeze the outputs (outputs[:, 0]) or reshape the labels to the outputs' shape; set "
                        "jax.config.update('jax_numpy_rank_promotion', 'raise') to catch such broadcasts at once")
    return f"batch loss {whole:.6g} = merged halves {halves:.6g}"


def params_get_gradients(case: Case) -> str:
    """Every parameter gets a nonzero gradient from the loss."""
    name = "params_get_gradients"
    for path, g in jax.tree_util.tree_leaves_with_path(case.step_grads):
        g = np.asarray(g)
        if g.size and np.issubdtype(g.dtype, np.floating) and not np.any(g):
            raise _fail(name, "a parameter gets no gradient: it does not reach the loss.",
                        where=path_str("params", path), expected="a nonzero gradient somewhere in the array",
                        got=f"all {g.size} elements exactly 0",
                        cause="a layer defined but not called (or its output discarded), a jax.lax.stop_gradient "
                              "on its path, or an integer cast / argmax between it and the loss",
                        fix="call the layer in __call__, or remove it; remove the stop_gradient")
    return f"all {len(jax.tree.leaves(case.step_grads))} parameter arrays get a gradient"
