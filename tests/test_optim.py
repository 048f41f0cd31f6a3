"""The optimizer factory: every optimizer and schedule builds and behaves as optax defines it."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jnn import optim
from jnn.optim import OptimConfig, make_optimizer, make_schedule

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}, "norm": {"scale": jnp.ones((2,))}}


def _quadratic_descends(tx, steps=50):
    params = jax.tree.map(lambda p: p * 2.0, PARAMS)
    loss = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    start = loss(params)
    for _ in range(steps):
        params, state = step(params, state)
    return float(loss(params)), float(start)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_descends(name):
    end, start = _quadratic_descends(make_optimizer(name=name, learning_rate=0.05, weight_decay=1e-4))
    assert end < 0.5 * start, (name, start, end)


def test_sgd_nesterov_matches_optax():
    ours = make_optimizer(name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True)
    theirs = optax.sgd(0.1, momentum=0.9, nesterov=True)
    grads = jax.tree.map(lambda p: p * 0.3, PARAMS)
    u1, _ = ours.update(grads, ours.init(PARAMS), PARAMS)
    u2, _ = theirs.update(grads, theirs.init(PARAMS), PARAMS)
    chex.assert_trees_all_close(u1, u2)


@pytest.mark.parametrize(
    "config, expected",
    [
        (OptimConfig(learning_rate=0.1), {0: 0.1, 500: 0.1}),
        (OptimConfig(learning_rate=0.1, schedule="warmup_cosine", warmup_steps=10, total_steps=110),
         {0: 0.0, 5: 0.05, 10: 0.1, 60: 0.05, 110: 0.0}),
        (OptimConfig(learning_rate=0.1, schedule="cosine", total_steps=100), {0: 0.1, 50: 0.05, 100: 0.0}),
        (OptimConfig(learning_rate=0.1, schedule="step", boundaries=(10, 20), decay_rate=0.1),
         {0: 0.1, 9: 0.1, 10: 0.01, 20: 0.001}),
        (OptimConfig(learning_rate=0.1, schedule="exponential", decay_steps=10, decay_rate=0.5),
         {0: 0.1, 10: 0.05, 20: 0.025}),
        (OptimConfig(learning_rate=1.0, schedule="one_cycle", total_steps=100), {30: 1.0, 100: 0.0}),
        (OptimConfig(learning_rate=0.1, schedule="linear", total_steps=10), {0: 0.1, 5: 0.05, 10: 0.0}),
        (OptimConfig(learning_rate=0.1, schedule="constant", warmup_steps=4), {0: 0.0, 2: 0.05, 4: 0.1, 99: 0.1}),
    ],
    ids=["constant", "warmup_cosine", "cosine", "step", "exponential", "one_cycle", "linear", "warmup"],
)
def test_schedules(config, expected):
    schedule = make_schedule(config)
    for step, value in expected.items():
        np.testing.assert_allclose(schedule(step), value, atol=1e-4, err_msg=f"step {step}")


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamm'.*'sgd', 'adam', 'adamw'.*Did you mean 'adam"):
        make_optimizer(name="adamm")
    with pytest.raises(ValueError, match=r"unknown schedule 'cosin'.*'warmup_cosine'"):
        make_optimizer(schedule="cosin")
    with pytest.raises(ValueError, match="needs total_steps > 0"):
        make_optimizer(schedule="cosine")
    with pytest.raises(ValueError, match=r"needs total_steps > warmup_steps; got total_steps=2, warmup_steps=2"):
        make_optimizer(schedule="warmup_cosine", total_steps=2, warmup_steps=2)


def test_weight_decay_mask_skips_biases_and_norm_scales():
    zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
    for name in ("sgd", "adamw"):
        tx = make_optimizer(name=name, learning_rate=0.1, weight_decay=0.5, momentum=0.0)
        updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
        assert float(jnp.abs(updates["dense"]["kernel"]).min()) > 0, name
        chex.assert_trees_all_equal(updates["dense"]["bias"], jnp.zeros(2))
        chex.assert_trees_all_equal(updates["norm"]["scale"], jnp.zeros(2))
    tx = make_optimizer(name="adamw", learning_rate=0.1, weight_decay=0.5, decay_mask="all")
    updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
    assert float(jnp.abs(updates["dense"]["bias"]).min()) > 0


def test_clipping_bounds_the_update():
    tx = make_optimizer(name="sgd", learning_rate=1.0, momentum=0.0, clip_norm=1.0)
    grads = jax.tree.map(lambda p: p * 100.0, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)


def test_frozen_parameters_do_not_move():
    tx = make_optimizer(name="adam", learning_rate=0.1, frozen=("^dense/",))
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    chex.assert_trees_all_equal(updates["dense"], jax.tree.map(jnp.zeros_like, PARAMS["dense"]))
    assert float(jnp.abs(updates["norm"]["scale"]).min()) > 0
