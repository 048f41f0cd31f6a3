"""Magnitude pruning (Zhu & Gupta 2017): the schedule, exact sparsity, weights that stay pruned
through jitted training and checkpoints, structured pruning, accuracy, and the errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jnn
from jnn.pruning import Pruning, PruningState, masks, sparsity_report

PARAMS = {"dense": {"kernel": jnp.arange(1.0, 13.0).reshape(3, 4), "bias": jnp.ones((4,))},
          "head": {"kernel": jnp.arange(-6.0, 0.0).reshape(3, 2), "bias": jnp.ones((2,))},
          "norm": {"scale": jnp.ones((4,))}}


@pytest.fixture(scope="module")
def digits():
    splits = jnn.data.load("digits", val_fraction=0.1, seed=0)
    flat = lambda split: {"inputs": split["inputs"].reshape(len(split["inputs"]), -1), "labels": split["labels"]}
    return flat(splits.train), flat(splits.test)


def _mlp_state(train, pruning, learning_rate=1e-2):
    tx = optax.chain(optax.adam(learning_rate), pruning.transform())
    model = jnn.models.MLP(hidden_sizes=(32,), num_classes=10)
    return jnn.create_train_state(model, tx, train["inputs"][:1], 0)


def _batches(train, n, seed=0, size=64):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        idx = rng.integers(0, len(train["labels"]), size)
        yield {"inputs": train["inputs"][idx], "labels": train["labels"][idx]}


def _zeros_follow_masks(state):
    """Every masked weight is exactly 0.0; returns the masks as numpy."""
    found = jax.device_get(masks(state.opt_state))
    params = jax.device_get(state.params)
    for m, p in zip(jax.tree.leaves(found), jax.tree.leaves(params)):
        if np.ndim(m):
            assert np.all(p[~m] == 0.0)
    return found


def _accuracy(state, data):
    return float(jnn.evaluate(state, jnn.data.Pipeline(data, 256, train=False), loss_fn="cross_entropy")["accuracy"])


def test_schedule_is_zhu_and_gupta_polynomial():
    pruning = Pruning(0.8, begin_step=100, end_step=200, power=3.0)
    expected = {0: 0.0, 100: 0.0, 150: 0.8 * (1 - 0.5 ** 3), 190: 0.8 * (1 - 0.1 ** 3), 200: 0.8, 1000: 0.8}
    for step, value in expected.items():
        np.testing.assert_allclose(pruning.schedule(step), value, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
    values = np.asarray(jax.jit(jax.vmap(pruning.schedule))(jnp.arange(0, 301)))
    assert np.all(np.diff(values) >= 0) and values[-1] == np.float32(0.8)
    linear = Pruning(0.5, end_step=10, power=1.0)
    np.testing.assert_allclose(linear.schedule(5), 0.25)


def test_update_prunes_exactly_round_sparsity_n_on_ties_and_leaves_biases_alone():
    pruning = Pruning(0.5, end_step=1, frequency=1)  # the first update reaches the target
    tx = pruning.transform()
    state = tx.init(PARAMS)
    assert jax.tree.map(jnp.shape, state.masks) == {
        "dense": {"kernel": (3, 4), "bias": ()}, "head": {"kernel": (3, 2), "bias": ()}, "norm": {"scale": ()}}
    ties = jax.tree.map(jnp.ones_like, PARAMS)  # every magnitude equal: a <= threshold would prune all
    grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), PARAMS)
    updates, state = tx.update(grads, state, ties)
    new = optax.apply_updates(ties, updates)
    assert int(jnp.sum(new["dense"]["kernel"] == 0)) == 6 and int(jnp.sum(new["head"]["kernel"] == 0)) == 3
    for name in ("dense/bias", "head/bias", "norm/scale"):  # not targets: updates passed through as given
        a, b = name.split("/")
        np.testing.assert_array_equal(updates[a][b], grads[a][b])
    assert int(state.count) == 1
    # Layer scope ranks each array by |w| after the update: the smallest half of each goes.
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    np.testing.assert_array_equal(new["dense"]["kernel"].ravel(), [0] * 6 + list(range(7, 13)))
    np.testing.assert_array_equal(new["head"]["kernel"].ravel(), [-6, -5, -4, 0, 0, 0])
    # Global scope: one threshold over both kernels (magnitudes 1..12 and 6..1): the 9 smallest go.
    tx = Pruning(0.5, end_step=1, frequency=1, scope="global").transform()
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    np.testing.assert_array_equal(new["dense"]["kernel"].ravel(), [0] * 5 + list(range(6, 13)))
    np.testing.assert_array_equal(new["head"]["kernel"].ravel(), [-6, -5, 0, 0, 0, 0])  # ties: first come
    report = sparsity_report(new)
    assert report == {"dense/kernel": 5 / 12, "head/kernel": 4 / 6, "total": 0.5, "all": 9 / 28}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruned_weights_stay_zero_through_training_and_reach_the_target(digits, scope):
    train, _ = digits
    pruning = Pruning(0.6, end_step=60, frequency=10, scope=scope)
    state = _mlp_state(train, pruning)
    step = jax.jit(jnn.make_train_step("cross_entropy"), donate_argnums=0)
    before, reached = None, []
    for batch in _batches(train, 100):
        state, _ = step(state, batch)
        now = _zeros_follow_masks(state)
        kept = np.concatenate([m.ravel() for m in jax.tree.leaves(now) if np.ndim(m)])
        if before is not None:
            assert not np.any(kept & ~before), "a pruned weight came back"
        before = kept
        reached.append(1 - kept.mean())
    assert reached[8] == 0 and 0 < reached[9] < reached[19] < reached[59] == reached[-1]  # step 10, 20, 60
    report = sparsity_report(state.params, pruning)
    assert set(report) == {"dense_0/kernel", "head/kernel", "total", "all"}  # biases are not targets
    n = {"dense_0/kernel": 64 * 32, "head/kernel": 32 * 10}
    if scope == "layer":
        for path, size in n.items():
            assert report[path] * size == round(0.6 * size), (path, report)
    assert report["total"] * sum(n.values()) == round(0.6 * sum(n.values())), report
    assert jax.tree.map(jnp.shape, masks(state.opt_state))["dense_0"]["bias"] == ()
    print(f"{scope}: {report}")


def test_structured_pruning_zeroes_whole_output_units(digits):
    train, _ = digits
    pruning = Pruning(0.5, end_step=20, frequency=5, structured=True, targets=("^dense_0/kernel$",))
    state = _mlp_state(train, pruning)
    state = jnn.fit(state, iter(list(_batches(train, 30))), num_steps=30, loss_fn="cross_entropy",
                    progress=False).state
    kernel = np.asarray(state.params["dense_0"]["kernel"])  # (64 inputs, 32 units)
    dead = np.all(kernel == 0, axis=0)
    assert dead.sum() == 16
    assert np.count_nonzero(kernel == 0) == 16 * 64  # no stray zeros outside the pruned columns
    mask = masks(state.opt_state)["dense_0"]["kernel"]
    np.testing.assert_array_equal(np.asarray(mask), np.broadcast_to(~dead, kernel.shape))
    assert np.count_nonzero(np.asarray(state.params["head"]["kernel"]) == 0) == 0  # not a target
    assert set(sparsity_report(state, pruning)) == {"dense_0/kernel", "total", "all"}
    # Global structured: units ranked together; the pruned weights stay within the target.
    tx = Pruning(0.5, end_step=1, frequency=1, structured=True, scope="global").transform()
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    for kernel in (new["dense"]["kernel"], new["head"]["kernel"]):
        assert np.all(np.all(kernel == 0, axis=0) | np.all(kernel != 0, axis=0))
    assert 0.4 < sparsity_report(new)["total"] <= 0.5


def test_checkpoint_keeps_zeros_and_masks_and_training_goes_on(digits, tmp_path):
    train, _ = digits
    pruning = Pruning(0.7, end_step=50, frequency=10)
    step = jax.jit(jnn.make_train_step("cross_entropy"), donate_argnums=0)
    state = _mlp_state(train, pruning)
    batches = list(_batches(train, 60))
    for batch in batches[:30]:
        state, _ = step(state, batch)
    saved = jax.device_get((state.params, masks(state.opt_state)))
    ckpt = jnn.Checkpointer(tmp_path / "ckpt")
    ckpt.save(state)
    ckpt.close()
    restored, _ = jnn.Checkpointer(tmp_path / "ckpt").restore(_mlp_state(train, pruning))
    got = jax.device_get((restored.params, masks(restored.opt_state)))
    jax.tree.map(np.testing.assert_array_equal, got, saved)
    assert int(restored.step) == 30 and int(jax.tree.leaves(
        restored.opt_state, is_leaf=lambda x: isinstance(x, PruningState))[-1].count) == 30
    assert jax.tree.leaves(got[1])[0].dtype == np.bool_
    for batch in batches[30:]:
        restored, _ = step(restored, batch)
        _zeros_follow_masks(restored)
    assert sparsity_report(restored, pruning)["total"] == round(0.7 * 2368) / 2368


def test_fifty_percent_pruned_mlp_keeps_its_test_accuracy(digits):
    train, test = digits
    dense = _mlp_state(train, Pruning(0.0, end_step=1), learning_rate=3e-3)
    dense = jnn.fit(dense, jnn.data.Pipeline(train, 64, seed=0), num_steps=300, loss_fn="cross_entropy",
                    progress=False).state
    dense_acc = _accuracy(dense, test)
    pruning = Pruning(0.5, end_step=200, frequency=10)
    tx = optax.chain(optax.adam(3e-3), pruning.transform())
    params = jax.tree.map(jnp.copy, dense.params)
    pruned = dense.replace(params=params, tx=tx, opt_state=tx.init(params))
    pruned = jnn.fit(pruned, jnn.data.Pipeline(train, 64, seed=1), num_steps=600, loss_fn="cross_entropy",
                     progress=False).state
    pruned_acc = _accuracy(pruned, test)
    report = sparsity_report(pruned, pruning)
    print(f"dense test accuracy {dense_acc:.4f}; pruned to {report['total']:.2f} of the kernels "
          f"({report['all']:.3f} of all parameters): {pruned_acc:.4f} ({pruned_acc - dense_acc:+.4f})")
    assert report["total"] == 0.5
    assert dense_acc > 0.9
    assert pruned_acc > 0.9 and pruned_acc > dense_acc - 0.03


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.0, "end_step": 10}, r"sparsity=1.0; expected sparsity a number in \[0, 1\)"),
    ({"sparsity": -0.1, "end_step": 10}, r"sparsity=-0.1; expected sparsity a number in \[0, 1\)"),
    ({"sparsity": 0.5, "begin_step": 10, "end_step": 10}, r"end_step=10; expected end_step an int > begin_step=10"),
    ({"sparsity": 0.5, "end_step": 10, "scope": "net"}, r"scope='net'; expected scope 'layer' or 'global'"),
    ({"sparsity": 0.5, "end_step": 10, "frequency": 0}, r"frequency=0; expected frequency an int >= 1"),
    ({"sparsity": 0.5, "end_step": 10, "targets": "kernel$"}, r"expected targets a tuple of regular expressions"),
    ({"sparsity": 0.5, "end_step": 10, "targets": ("kernel(",)}, r"'kernel\(', which is not a regular expression"),
])
def test_bad_configs_say_what_was_expected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Pruning(**kwargs)


def test_bad_targets_and_missing_params_fail_before_compiling(digits):
    train, _ = digits
    with pytest.raises(ValueError, match=r"'conv.*/kernel' matches no parameter.*"
                                         r"\['dense_0/bias', 'dense_0/kernel', 'head/bias', 'head/kernel'\]"):
        _mlp_state(train, Pruning(0.5, end_step=10, targets=("kernel$", "conv.*/kernel")))
    tx = Pruning(0.5, end_step=10).transform()
    with pytest.raises(ValueError, match=r"needs the parameters.*params=None.*Fix: call tx.update\(grads, opt_state, params\)"):
        tx.update(PARAMS, tx.init(PARAMS))
    with pytest.raises(ValueError, match=r"no parameter to prune.*ndim > 1"):
        Pruning(0.5, end_step=10).transform().init({"bias": jnp.ones(3)})
    assert Pruning(0.5, end_step=10, targets=["kernel$"]).targets == ("kernel$",)  # a JSON list is fine
