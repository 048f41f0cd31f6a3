"""The pure train/eval step: shapes, jit == eager, no re-trace, gradients, accumulation, transforms."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jnn
from tests import tolerances as tol
from tests._tiny import TinyBNDropout, TinyMLP

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

CE = optax.softmax_cross_entropy_with_integer_labels


def _data(n=32, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = rng.integers(0, classes, size=n).astype(np.int32)
    return {"inputs": x, "labels": y}


def _state(model=None, tx=None, batch=None, seed=0):
    batch = batch or _data()
    return jnn.create_train_state(model or TinyMLP(), tx or optax.adam(1e-2), batch["inputs"][:1],
                                  jax.random.key(seed))


def _arrays(state):
    """The state's arrays, with the PRNG key as its raw data (chex cannot compare typed keys)."""
    return (state.step, state.params, state.opt_state, state.model_state, jax.random.key_data(state.rng))


@pytest.mark.parametrize("seed", [0, "key"])
def test_abstract_train_state_matches_the_real_one_and_precompiles_the_step(seed):
    batch = _data()
    model, tx = TinyBNDropout(), jnn.make_optimizer(name="adamw", learning_rate=1e-2, schedule="warmup_cosine",
                                                    warmup_steps=2, total_steps=10)
    rng = 0 if seed == 0 else jax.random.key(0)
    shapes = jnn.abstract_train_state(model, tx, batch["inputs"][:1], rng)
    state = jnn.create_train_state(model, tx, batch["inputs"][:1], rng)
    assert jax.tree.structure(shapes) == jax.tree.structure(state)  # same static fields (spec, tx, apply_fn)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(shapes))
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.tree.leaves(shapes), jax.tree.leaves(state))
    assert shapes.spec == state.spec and shapes.spec.output_shape == (3,)
    step = jax.jit(jnn.make_train_step(CE), donate_argnums=0)
    step.lower(shapes, batch).compile()  # ahead of time, from shapes only
    assert _compiles(lambda: jax.jit(jnn.make_train_step(CE))(state, batch))  # without: compiles
    assert _compiles(lambda: step(state, batch)) == []  # the real first call finds it in jit's cache


def _compiles(fn) -> list[str]:
    """The XLA compilations `fn()` triggers, from jax's compile log."""
    import logging

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            jax.block_until_ready(fn())
    finally:
        logger.removeHandler(handler)
    return [m for m in messages if "Finished XLA compilation" in m]


@pytest.mark.parametrize("masked", [False, True])
def test_metrics_subset_computes_only_those_and_updates_the_same(masked):
    batch = _data()
    if masked:
        batch["mask"] = (np.arange(32) % 3 != 0).astype(np.float32)
    tx = jnn.make_optimizer(name="adam", learning_rate=1e-2)
    full, full_metrics = jax.jit(jnn.make_train_step(CE))(_state(TinyBNDropout(), tx, batch), batch)
    bare, bare_metrics = jax.jit(jnn.make_train_step(CE, metrics=("loss",)))(_state(TinyBNDropout(), tx, batch), batch)
    # the default non-finite policy, "skip", reports `nonfinite` whatever the metrics asked for
    assert set(full_metrics) == {*jnn.train.step.TRAIN_METRICS, "nonfinite"}
    assert set(bare_metrics) == {"loss", "nonfinite"}
    chex.assert_trees_all_close(_arrays(bare), _arrays(full), rtol=0, atol=0)  # metrics never change the update
    np.testing.assert_array_equal(bare_metrics["loss"], full_metrics["loss"])
    _, some = jax.jit(jnn.make_train_step(CE, metrics=["accuracy", "learning_rate"]))(_state(TinyBNDropout(), tx, batch), batch)
    assert set(some) == {"loss", "accuracy", "learning_rate", "nonfinite"}


@pytest.mark.parametrize("metrics", [("loss", "gradnorm"), "gradnorm"])
def test_unknown_train_metric_lists_the_valid_ones(metrics):
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['gradnorm'\]; expected a collection of "
                                         r"\['loss', 'accuracy'"):
        jnn.make_train_step(CE, metrics=metrics)
    assert jnn.make_train_step(CE, metrics="loss")  # one name is a collection of one


@pytest.mark.parametrize("model", [TinyMLP(), TinyBNDropout()], ids=["plain", "bn_dropout"])
def test_shapes_of_state_and_metrics(model):
    batch = _data()
    state = _state(model, jnn.make_optimizer(name="adam", learning_rate=1e-2), batch)
    new_state, metrics = jax.jit(jnn.make_train_step(CE))(state, batch)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state.params, state.params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state.opt_state, state.opt_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state.model_state, state.model_state)
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "learning_rate", "nonfinite"}
    for value in metrics.values():
        chex.assert_shape(value, ())
    assert int(new_state.step) == 1
    outputs = state.apply_fn(state.variables, batch["inputs"])
    chex.assert_shape(outputs, (32, 3))


def test_model_state_only_for_models_that_have_it():
    assert _state(TinyMLP()).model_state == {}
    state = _state(TinyBNDropout())
    assert set(state.model_state) == {"batch_stats"}
    new_state, _ = jax.jit(jnn.make_train_step(CE))(state, _data())
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.model_state, state.model_state)
    assert all(jax.tree.leaves(changed)), "BatchNorm running statistics must update in training"


@pytest.mark.parametrize("model", [TinyMLP(), TinyBNDropout()], ids=["plain", "bn_dropout"])
def test_jit_equals_eager(model):
    batch = _data()
    step = jnn.make_train_step(CE)
    # SGD, not Adam: a bias feeding BatchNorm has a true gradient of 0, and Adam would scale the
    # float rounding noise in it (~1e-9) up to a full learning-rate step.
    state = _state(model, optax.sgd(0.1, momentum=0.9), batch=batch)
    eager_state, eager_metrics = step(state, batch)
    jit_state, jit_metrics = jax.jit(step)(state, batch)
    chex.assert_trees_all_close(_arrays(jit_state), _arrays(eager_state), rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    chex.assert_trees_all_close(jit_metrics, eager_metrics, rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)


def test_no_retrace_on_second_call_with_donation():
    chex.clear_trace_counter()
    train_step = jnn.make_train_step(CE)

    @chex.assert_max_traces(n=1)
    def traced(state, batch):
        return train_step(state, batch)

    step = jax.jit(traced, donate_argnums=0)
    state = _state(TinyBNDropout())
    for seed in range(3):  # new batch values each call: same shapes, no re-trace
        state, _ = step(state, _data(seed=seed))
    assert int(state.step) == 3


def test_tiny_model_overfits_fixed_batch():
    batch = _data(n=16)
    state = _state(TinyMLP(width=32), optax.adam(3e-2), batch)
    step = jax.jit(jnn.make_train_step(CE), donate_argnums=0)
    for _ in range(300):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 1e-2
    assert float(metrics["accuracy"]) == 1.0


def test_step_gradient_matches_finite_differences_float64():
    with jax.enable_x64(True):
        batch = _data(n=8)
        batch = {"inputs": batch["inputs"].astype(np.float64), "labels": batch["labels"]}
        model = TinyMLP(width=4, dtype=jnp.float64)
        # Plain SGD with learning rate 1: the update is exactly -grad, so we can read the step's gradient.
        state = jnn.create_train_state(model, optax.sgd(1.0), batch["inputs"][:1], jax.random.key(1))
        new_state, _ = jax.jit(jnn.make_train_step(CE))(state, batch)
        step_grad, unravel = ravel_pytree(jax.tree.map(lambda a, b: a - b, state.params, new_state.params))

        flat, _ = ravel_pytree(state.params)

        @jax.jit
        def loss(v):
            return CE(model.apply({"params": unravel(v)}, batch["inputs"]), batch["labels"]).mean()

        eye = np.eye(flat.size)
        fd = np.array([(loss(flat + tol.FINITE_DIFF_EPS * e) - loss(flat - tol.FINITE_DIFF_EPS * e))
                       / (2 * tol.FINITE_DIFF_EPS) for e in eye])
        assert step_grad.dtype == jnp.float64
        np.testing.assert_allclose(step_grad, fd, rtol=tol.GRAD_CHECK_RTOL, atol=tol.GRAD_CHECK_ATOL)


def test_gradient_accumulation_equals_one_big_batch():
    big = _data(n=32)
    k = 4
    accumulate = jnn.make_optimizer(name="adam", learning_rate=1e-2, accumulate_steps=k)
    single = jnn.make_optimizer(name="adam", learning_rate=1e-2)
    state_acc = _state(TinyMLP(), accumulate, big)
    state_one = _state(TinyMLP(), single, big)
    step = jax.jit(jnn.make_train_step(CE))
    for i in range(k):
        micro = jax.tree.map(lambda a, i=i: a[i * 8:(i + 1) * 8], big)
        before = state_acc.params
        state_acc, _ = step(state_acc, micro)
        if i < k - 1:  # no update until the k-th micro-batch
            chex.assert_trees_all_equal(state_acc.params, before)
    state_one, _ = step(state_one, big)
    chex.assert_trees_all_close(state_acc.params, state_one.params, rtol=tol.F32_REORDER_RTOL,
                                atol=tol.F32_REORDER_ATOL)


def test_mask_excludes_examples_exactly():
    batch = _data(n=8)
    mask = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32)
    step = jax.jit(jnn.make_train_step(CE))
    state = _state(TinyMLP(), optax.sgd(0.1), batch)
    masked, m1 = step(state, {**batch, "mask": mask})
    first_half, m2 = step(state, jax.tree.map(lambda a: a[:4], batch))
    chex.assert_trees_all_close(masked.params, first_half.params, rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=tol.F32_REORDER_RTOL)
    np.testing.assert_allclose(m1["accuracy"], m2["accuracy"], rtol=tol.F32_REORDER_RTOL)


def test_dropout_rng_is_derived_from_step_and_is_pure():
    batch = _data()
    step = jax.jit(jnn.make_train_step(CE))
    state = _state(TinyBNDropout(rate=0.5))
    _, a = step(state, batch)
    _, b = step(state, batch)
    _, c = step(state.replace(step=jnp.asarray(7, jnp.int32)), batch)
    assert float(a["loss"]) == float(b["loss"]), "the same state and batch must give the same result"
    assert float(a["loss"]) != float(c["loss"]), "a different step must draw a different dropout mask"


def test_vmap_over_ensemble_of_states_matches_individual_runs():
    batch = _data()
    step = jnn.make_train_step(CE)
    tx, model = optax.sgd(0.1, momentum=0.9), TinyBNDropout()  # one static tx/apply_fn for all
    states = [_state(model, tx, seed=s) for s in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    stacked = stacked.replace(rng=jnp.stack([s.rng for s in states]))
    vmapped, metrics = jax.jit(jax.vmap(step, in_axes=(0, None)))(stacked, batch)
    chex.assert_shape(metrics["loss"], (3,))
    for i, single in enumerate(states):
        expected, _ = jax.jit(step)(single, batch)
        chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], vmapped.params), expected.params,
                                    rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)


def test_pmap_with_axis_name_equals_single_device_on_global_batch():
    n = jax.local_device_count()
    assert n == 8, "tests/conftest.py gives 8 fake CPU devices"
    batch = _data(n=8 * 4)
    state = _state(TinyMLP(), optax.sgd(0.1), batch)
    single, single_metrics = jax.jit(jnn.make_train_step(CE))(state, batch)
    per_device = jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]), batch)
    replicated = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), state)
    pstep = jax.pmap(jnn.make_train_step(CE, axis_name="batch"), axis_name="batch")
    pstate, pmetrics = pstep(replicated, per_device)
    first = jax.tree.map(lambda a: a.addressable_shards[0].data[0], pstate.params)
    chex.assert_trees_all_close(first, single.params, rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    np.testing.assert_allclose(pmetrics["loss"].addressable_shards[0].data[0], single_metrics["loss"],
                               rtol=tol.F32_REORDER_RTOL)


def test_learning_rate_metric_follows_schedule():
    tx = jnn.make_optimizer(name="sgd", learning_rate=0.1, schedule="warmup_cosine", warmup_steps=4, total_steps=20)
    state = _state(TinyMLP(), tx)
    step = jax.jit(jnn.make_train_step(CE))
    schedule = jnn.make_schedule(jnn.OptimConfig(name="sgd", learning_rate=0.1, schedule="warmup_cosine",
                                                 warmup_steps=4, total_steps=20))
    for i in range(6):
        state, metrics = step(state, _data())
        np.testing.assert_allclose(metrics["learning_rate"], schedule(i), rtol=1e-6)


def test_string_loss_name_and_one_hot_labels():
    batch = _data()
    one_hot = {"inputs": batch["inputs"], "labels": jax.nn.one_hot(batch["labels"], 3)}
    state = _state()
    a, ma = jax.jit(jnn.make_train_step("cross_entropy"))(state, batch)
    b, mb = jax.jit(jnn.make_train_step("cross_entropy"))(state, one_hot)
    chex.assert_trees_all_close(a.params, b.params, rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    np.testing.assert_allclose(ma["accuracy"], mb["accuracy"])


def test_eval_step_is_eval_mode_and_accumulates():
    batch = _data(n=30)
    state = _state(TinyBNDropout(rate=0.5))
    eval_step = jax.jit(jnn.make_eval_step(CE, confusion=True, top_k=(2,)))
    whole = jnn.metrics.compute(eval_step(state, batch))
    again = jnn.metrics.compute(eval_step(state, batch))
    assert whole["loss"] == again["loss"], "eval mode: no dropout, deterministic"
    acc = None
    for start in range(0, 30, 8):  # last batch padded to 8 with a mask, as a loader does
        part = jax.tree.map(lambda a, s=start: a[s:s + 8], batch)
        pad = 8 - len(part["labels"])
        mask = np.concatenate([np.ones(len(part["labels"])), np.zeros(pad)]).astype(np.float32)
        part = jax.tree.map(lambda a, p=pad: np.concatenate([a, np.zeros((p,) + a.shape[1:], a.dtype)]), part)
        acc = jnn.metrics.merge(acc, eval_step(state, {**part, "mask": mask}))
    merged = jnn.metrics.compute(acc)
    for key in ("loss", "accuracy", "top_2_accuracy"):
        np.testing.assert_allclose(merged[key], whole[key], rtol=tol.F32_REORDER_RTOL)
    np.testing.assert_array_equal(merged["confusion"], whole["confusion"])
    assert merged["confusion"].sum() == 30


# ------------------------------------------------------------------ bad input, before compiling


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda b: {"labels": b["labels"]}, r"missing key\(s\) \['inputs'\]"),
        (lambda b: {"inputs": b["inputs"]}, r"missing key\(s\) \['labels'\]"),
        (lambda b: {**b, "inputs": b["inputs"][:, None, :]}, r"rank 3 .*expected|rank 3"),
        (lambda b: {**b, "inputs": b["inputs"][:, :4]}, r"shape \(32, 4\); expected \(B, 5\)"),
        (lambda b: {**b, "inputs": b["inputs"].astype(np.int32)}, r"dtype int32; expected float32"),
        (lambda b: {**b, "labels": b["labels"][:10]}, r"same leading batch size"),
        (lambda b: {**b, "mask": np.ones(7)}, r"batch\['mask'\] has shape \(7,\)"),
        (lambda b: (b["inputs"], b["labels"]), r"expected the batch to be a dict"),
    ],
)
def test_bad_batches_raise_value_error_before_compiling(change, match):
    state = _state()
    bad = change(_data())
    traced = jax.jit(jnn.make_train_step(CE)).trace  # tracing only: nothing is compiled
    with pytest.raises(ValueError, match=match):
        traced(state, bad)
    with pytest.raises(ValueError, match=match):
        jax.jit(jnn.make_eval_step(CE)).trace(state, bad)


def test_labels_out_of_range_raise_on_host_and_are_nan_under_jit():
    state = _state()
    batch = _data()
    bad = {**batch, "labels": batch["labels"] + 3}
    with pytest.raises(ValueError, match=r"values in \[3, 5\]; the model has 3 output classes"):
        jnn.make_train_step(CE)(state, bad)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        jnn.check_batch(state, bad)
    # Inside jit the values are unknown while tracing; the loss is NaN, never silently wrong.
    _, metrics = jax.jit(jnn.make_train_step(CE))(state, bad)
    assert np.isnan(float(metrics["loss"]))


def test_scalar_loss_with_mask_is_rejected():
    state = _state()
    batch = {**_data(), "mask": np.ones(32, np.float32)}
    with pytest.raises(ValueError, match="returned a scalar"):
        jax.jit(jnn.make_train_step(lambda o, y: CE(o, y).mean())).trace(state, batch)


def test_mask_with_more_axes_than_the_losses_is_rejected_while_tracing():
    """Per-token labels and mask (B, T), but a loss that averages over T: the mask cannot apply."""
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.normal(size=(8, 4, 5)).astype(np.float32), "labels": rng.integers(0, 3, (8, 4)),
             "mask": np.ones((8, 4), np.float32)}
    state = jnn.create_train_state(TinyMLP(), optax.adam(1e-2), batch["inputs"][:1], 0)
    step = jnn.make_train_step(lambda o, y: CE(o, y).mean(-1))  # (B,) losses
    with pytest.raises(ValueError, match=r"'mask' has shape \(8, 4\), but the loss function returned losses of "
                                         r"shape \(8,\).*Fix: return one loss per masked element"):
        jax.jit(step).trace(state, batch)
    with pytest.raises(ValueError, match=r"must be a prefix"):
        jnn.losses.masked_mean(np.ones((8,)), np.ones((8, 4)))
    losses = np.arange(8.0).reshape(4, 2)
    np.testing.assert_allclose(jnn.losses.masked_mean(losses, np.array([[1.0], [0.0], [1.0], [0.0]])), 2.5)  # (B, 1)


def test_the_mask_rule_is_one_rule_for_check_batch_and_the_losses():
    # A (B, 1) mask with (B, T) labels broadcasts in the losses, so check_batch accepts it too.
    state = jnn.abstract_train_state(jnn.models.get("gpt_char_tiny", vocab_size=5, block_size=4, num_layers=1,
                                                    num_heads=1, embed_dim=8), optax.sgd(0.1),
                                     np.zeros((1, 4), np.int32), 0)
    batch = {"inputs": np.zeros((3, 4), np.int32), "labels": np.zeros((3, 4), np.int32)}
    jnn.check_batch(state, {**batch, "mask": np.ones((3, 1), np.float32)})
    jnn.check_batch(state, {**batch, "mask": np.ones((3, 4), np.float32)})
    for bad in (np.ones((3, 2), np.float32), np.ones((1, 4), np.float32), np.ones((3, 4, 2), np.float32)):
        with pytest.raises(ValueError, match=r"batch\['mask'\] has shape"):
            jnn.check_batch(state, {**batch, "mask": bad})


def test_steps_are_values_that_say_what_they_are():
    step = jnn.make_train_step("cross_entropy", axis_name="batch", on_nonfinite="skip")
    assert isinstance(step, jnn.Step)
    assert (step.kind, step.axis_name, step.on_nonfinite) == ("train", "batch", "skip")
    assert jnn.make_eval_step("cross_entropy").kind == "eval"
    with pytest.raises(ValueError, match="kind='test'"):
        jnn.Step(lambda state, batch: state, "test")
