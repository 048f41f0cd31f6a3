"""Never apply a NaN: the step's non-finite policy, masked NaN examples, out-of-range labels, fit's guard."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jnn
from jnn.train.step import TRAIN_METRICS, _all_finite, _global_norm, _sums_finite
from tests import tolerances as tol
from tests._tiny import TinyBNDropout

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

B, F, C = 16, 5, 3


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.normal(size=(B, F)).astype(np.float32),
            "labels": rng.integers(0, C, size=B).astype(np.int32)}


def _state(tx=None):
    return jnn.create_train_state(TinyBNDropout(classes=C), tx or optax.adam(1e-2), _batch()["inputs"][:1], 0)


def _arrays(state):
    return jax.device_get((state.params, state.opt_state, state.model_state))


def _poisoned(kind):
    batch = _batch()
    if kind == "nan_input":
        batch["inputs"][3, 2] = np.nan
    elif kind == "inf_input":
        batch["inputs"][5, 0] = np.inf
    elif kind == "nan_soft_label":  # a label-smoothing / soft target with a NaN
        soft = np.eye(C, dtype=np.float32)[batch["labels"]] * 0.9 + 0.1 / C
        soft[2, 1] = np.nan
        batch["labels"] = soft
    return batch


@pytest.mark.parametrize("kind", ["nan_input", "inf_input", "nan_soft_label"])
def test_skip_leaves_the_state_bitwise_unchanged_and_reports_it(kind):
    loss = "cross_entropy"
    state = _state()
    state, _ = jax.jit(jnn.make_train_step(loss, on_nonfinite="skip"))(state, _batch(1))  # a real optimizer state
    before = _arrays(state)
    step = jax.jit(jnn.make_train_step(loss, on_nonfinite="skip"))
    after, metrics = step(state, _poisoned(kind))
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    chex.assert_trees_all_equal(_arrays(after), before)
    assert int(after.step) == int(state.step) + 1
    # and a good batch afterwards trains normally
    again, metrics = step(after, _batch(2))
    assert float(metrics["nonfinite"]) == 0.0 and all(np.isfinite(x).all() for x in jax.tree.leaves(_arrays(again)))


def test_apply_keeps_the_nan_forever_which_is_why_skip_is_the_default():
    state = _state()
    poisoned, _ = jax.jit(jnn.make_train_step("cross_entropy", on_nonfinite="apply"))(state, _poisoned("nan_input"))
    assert not all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(poisoned.params)))
    kept, metrics = jax.jit(jnn.make_train_step("cross_entropy"))(state, _poisoned("nan_input"))  # the default
    assert float(metrics["nonfinite"]) == 1.0
    chex.assert_trees_all_equal(_arrays(kept), _arrays(state))


@pytest.mark.parametrize("metrics", [TRAIN_METRICS, ("loss",)])
def test_nan_gradient_with_a_finite_loss_is_skipped_at_the_chosen_step(metrics):
    # with the grad_norm metric the check reads the norm; without it, the gradients' sum
    def loss_fn(outputs, labels, batch):
        # sqrt(|0|) has an infinite derivative: at the poisoned step (poison == 0) the loss is finite
        # but the gradient is NaN.
        poison = jnp.sqrt(jnp.abs(outputs.sum() * batch["poison"][0]))
        return optax.softmax_cross_entropy_with_integer_labels(outputs, labels) + 0.0 * poison

    step = jax.jit(jnn.make_train_step(loss_fn, on_nonfinite="skip", metrics=metrics))
    state = _state()
    flags = []
    for i in range(4):
        batch = {**_batch(i), "poison": np.full((B,), 0.0 if i == 2 else 1.0, np.float32)}
        before = _arrays(state)
        state, metrics = step(state, batch)
        flags.append(float(metrics["nonfinite"]))
        assert np.isfinite(float(metrics["loss"]))
        if i == 2:
            chex.assert_trees_all_equal(_arrays(state), before)
    assert flags == [0.0, 0.0, 1.0, 0.0]


def _leaves():
    rng = np.random.default_rng(0)
    return {"kernel": rng.normal(size=(6, 4)).astype(np.float32),
            "conv": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32),
            "scalar": np.float32(0.5),
            "half": np.full((8, 2), 30000.0, np.float16),  # sums past float16's 65504
            "bf16": rng.normal(size=(4, 4)).astype(jnp.bfloat16),
            "complex": (rng.normal(size=(2, 3)) + 1j).astype(np.complex64),
            "count": np.int32(7),
            "empty": np.zeros((0, 4), np.float32)}


@pytest.mark.parametrize("backend", ["cpu", "other"])  # a product with ones on a CPU, jnp.sum elsewhere
@pytest.mark.parametrize("leaf", ["kernel", "conv", "bias", "scalar", "half", "bf16", "complex"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_the_gradient_check_sees_a_nan_or_inf_in_any_leaf(leaf, bad, backend, monkeypatch):
    if backend == "other":
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    tree = _leaves()
    assert bool(jax.jit(_sums_finite)(tree))  # finite, also with float16 values summing past 65504
    x = np.array(tree[leaf])
    x.reshape(-1)[x.size // 2] = complex(0, bad) if leaf == "complex" else bad  # complex: in the imaginary part
    tree[leaf] = x
    assert not bool(jax.jit(_sums_finite)(tree))


def test_the_gradient_check_sees_opposite_infinities_whose_sum_is_nan():
    tree = _leaves()
    tree["kernel"][0, 0], tree["kernel"][3, 2] = np.inf, -np.inf
    assert not bool(jax.jit(_sums_finite)(tree))


def test_the_checks_of_float64_trees_trace_under_strict_promotion():
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        tree = {"w": np.ones((3, 2)), "b": np.ones(2), "s": np.float32(1.0)}
        assert bool(jax.jit(_sums_finite)(tree)) and bool(jax.jit(_all_finite)(tree))
        tree["w"][1, 1] = np.nan
        assert not bool(jax.jit(_sums_finite)(tree)) and not bool(jax.jit(_all_finite)(tree))


def test_the_gradient_norm_of_half_precision_leaves_does_not_overflow():
    grads = {"a": np.full((100,), 100.0, np.float16), "b": np.full((4, 4), 3.0, jnp.bfloat16)}
    norm = float(jax.jit(_global_norm)(grads))  # sqrt(100 * 100**2 + 16 * 9) = 1000.07: float16 squares overflow
    np.testing.assert_allclose(norm, np.sqrt(100 * 100.0 ** 2 + 16 * 9.0), rtol=1e-6)


class _StateWithNaN(nn.Module):
    """Writes sqrt(mean input) into a state collection: NaN for a batch of negative mean, while
    the loss stays finite; and a finfo.max sentinel, which must not count as non-finite."""

    @nn.compact
    def __call__(self, x):
        stat = self.variable("stats", "root_mean", lambda: jnp.zeros(()))
        sentinel = self.variable("stats", "sentinel", lambda: jnp.full((4,), jnp.finfo(jnp.float32).max))
        if not self.is_initializing():
            stat.value = jnp.sqrt(jnp.mean(x))
            sentinel.value = sentinel.value
        return nn.Dense(C)(x)


@pytest.mark.parametrize("metrics", [TRAIN_METRICS, ("loss",)])
def test_a_nan_in_the_model_state_with_a_finite_loss_is_skipped(metrics):
    good = _batch()
    good["inputs"] = np.abs(good["inputs"])
    bad = {**good, "inputs": -good["inputs"]}
    state = jnn.create_train_state(_StateWithNaN(), optax.adam(1e-2), good["inputs"][:1], 0)
    step = jax.jit(jnn.make_train_step("cross_entropy", on_nonfinite="skip", metrics=metrics))
    state, metrics_good = step(state, good)  # the sentinels are finite: applied
    assert float(metrics_good["nonfinite"]) == 0.0
    before = _arrays(state)
    after, metrics_bad = step(state, bad)
    assert np.isfinite(float(metrics_bad["loss"])) and float(metrics_bad["nonfinite"]) == 1.0
    chex.assert_trees_all_equal(_arrays(after), before)


def test_a_masked_nan_example_does_not_reach_the_update():
    batch = _batch()
    batch["inputs"][0, :] = np.nan
    masked = {**batch, "mask": np.r_[0.0, np.ones(B - 1)].astype(np.float32)}
    state = jnn.create_train_state(jnn.models.MLP(hidden_sizes=(8,), num_classes=C), optax.sgd(0.1),
                                   batch["inputs"][:1], 0)
    step = jax.jit(jnn.make_train_step("cross_entropy", on_nonfinite="apply"))  # even the bare step
    got, metrics = step(state, masked)
    want, want_metrics = step(state, {k: v[1:] for k, v in batch.items()})
    np.testing.assert_allclose(float(metrics["loss"]), float(want_metrics["loss"]), rtol=tol.F32_REORDER_RTOL)
    chex.assert_trees_all_close(jax.device_get(got.params), jax.device_get(want.params),
                                rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)


@pytest.mark.parametrize("label", [-1, C])
def test_out_of_range_labels_under_jit_give_nan_not_another_class(label):
    state = _state()
    batch = _batch()
    batch["labels"][4] = label
    _, metrics = jax.jit(jnn.make_train_step(optax.softmax_cross_entropy_with_integer_labels,
                                             on_nonfinite="apply"))(state, batch)
    assert np.isnan(float(metrics["loss"]))
    _, metrics = jax.jit(jnn.make_train_step("cross_entropy", on_nonfinite="skip"))(state, batch)
    assert float(metrics["nonfinite"]) == 1.0
    totals = jax.jit(jnn.make_eval_step("cross_entropy"))(state, batch)
    assert np.isnan(float(jnn.metrics.compute(totals)["loss"]))


def _data_with_nan(nan_rows):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, F)).astype(np.float32)
    x[list(nan_rows), 1] = np.nan
    return {"inputs": x, "labels": rng.integers(0, C, size=64).astype(np.int32)}


def test_fit_skips_nan_batches_reports_the_count_and_saves_finite_checkpoints(tmp_path):
    data = _data_with_nan([5])  # one example: one batch of every epoch
    with jnn.Checkpointer(tmp_path / "ckpt") as ckpt:
        result = jnn.fit(_state(), jnn.data.Pipeline(data, 16, seed=0, shuffle=False), num_steps=12,
                         loss_fn="cross_entropy", log_every=4, checkpointer=ckpt)
        restored, _ = ckpt.restore(_state())
    assert result.history[-1]["nonfinite"] == 3.0  # epochs of 4 batches: steps 0, 4 and 8
    for tree in (result.state, restored):
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(_arrays(tree)))


def test_fit_stops_after_max_nonfinite_consecutive_steps_naming_step_and_position():
    data = _data_with_nan(range(64))  # every batch
    with pytest.raises(jnn.NonFiniteError, match=r"step 2 \(batch position 2\).*3 consecutive.*since step 0"):
        jnn.fit(_state(), jnn.data.Pipeline(data, 16, seed=0, shuffle=False), num_steps=12,
                loss_fn="cross_entropy", log_every=4, max_nonfinite=3)


def test_fit_raise_stops_at_the_first_nonfinite_step():
    data = _data_with_nan([37])  # batch 2 of the unshuffled epoch
    with pytest.raises(jnn.NonFiniteError, match=r"step 2 \(batch position 2\)"):
        jnn.fit(_state(), jnn.data.Pipeline(data, 16, seed=0, shuffle=False), num_steps=12,
                loss_fn="cross_entropy", log_every=4, on_nonfinite="raise")


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        jnn.make_train_step("cross_entropy", on_nonfinite="ignore")


def test_jnn_train_on_data_with_a_nan_example_skips_it_and_saves_finite_checkpoints(tmp_path, capsys):
    from jnn import cli, experiment

    digits = jnn.data.load("digits")
    inputs = digits.train["inputs"].copy()
    inputs[7, 3, 3, 0] = np.nan
    path = tmp_path / "data.npz"
    np.savez(path, inputs=inputs, labels=digits.train["labels"],
             inputs_test=digits.test["inputs"], labels_test=digits.test["labels"])
    run = tmp_path / "run"
    code = cli.main(["train", "--debug", "--run-dir", str(run), "--set", f"data.name=npz:{path}",
                     "--set", "train.steps=40", "--set", "train.log_every=10", "--set", "data.batch_size=256"])
    out = capsys.readouterr().out
    assert code == 0 and "skipped" in out and "non-finite" in out
    config = experiment.read_config(str(run))
    with jnn.Checkpointer(run / "checkpoints") as ckpt:
        for step in ckpt.all_steps():
            state, _ = ckpt.restore(experiment.build(config).state, step=step)
            assert all(np.isfinite(x).all() for x in jax.tree.leaves(_arrays(state)))


def test_integer_targets_of_a_one_output_regression_are_not_taken_as_class_ids():
    def squared(outputs, labels):
        return (outputs[:, 0] - labels.astype(jnp.float32)) ** 2

    state = jnn.create_train_state(jnn.models.MLP(hidden_sizes=(4,), num_classes=1), optax.sgd(0.01),
                                   _batch()["inputs"][:1], 0)
    batch = {"inputs": _batch()["inputs"], "labels": np.arange(B, dtype=np.int32)}  # counts 0..15
    _, metrics = jax.jit(jnn.make_train_step(squared, on_nonfinite="skip"))(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0.0
