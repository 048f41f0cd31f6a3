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


def test_l2_is_the_gradient_of_the_textbook_penalty():
    """`l2=λ` makes one step of any optimizer the step on `loss + λ/2 * sum(w**2)` over the decayed
    parameters (kernels), with the penalty's gradient before clipping and the optimizer."""
    lam, lr = 0.3, 0.1
    params = {"dense": {"kernel": jnp.arange(6.0).reshape(3, 2) / 6, "bias": jnp.ones((2,))}}
    data_loss = lambda p: jnp.sum(jnp.tanh(p["dense"]["kernel"]) ** 2) + jnp.sum(p["dense"]["bias"] ** 3)
    penalised = lambda p: data_loss(p) + lam / 2 * jnp.sum(p["dense"]["kernel"] ** 2)
    for name, hand in (("sgd", optax.sgd(lr)), ("adam", optax.adam(lr))):
        tx = make_optimizer(OptimConfig(name, lr, momentum=0.0, l2=lam))
        updates, _ = tx.update(jax.grad(data_loss)(params), tx.init(params), params)
        want, _ = hand.update(jax.grad(penalised)(params), hand.init(params), params)
        chex.assert_trees_all_close(updates, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"l2=-1.0; expected l2 >= 0"):
        OptimConfig("sgd", 0.1, l2=-1.0)


def test_plateau_follows_optax_reduce_on_plateau_on_evaluation_metrics():
    plateau = optim.Plateau("loss", mode="min", factor=0.5, patience=2)
    tx = optax.chain(optax.sgd(1.0), plateau.transform())
    state = tx.init(PARAMS)
    reference = optax.contrib.reduce_on_plateau(factor=0.5, patience=2)
    ref_state = reference.init(PARAMS)
    scales = []
    for value in [1.0, 0.8, 0.9, 0.85, 0.81, 0.7, 0.75, 0.72, 0.71]:
        state = plateau.update(state, {"loss": value, "accuracy": 0.5})
        _, ref_state = reference.update({}, ref_state, value=value)
        scales.append(float(optim.plateau_scale(state)))
        assert scales[-1] == float(ref_state.scale)
    assert scales == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, state, PARAMS)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.25 * g, grads))
    maximise = optim.Plateau("accuracy", mode="max", factor=0.5, patience=1)
    state = optax.chain(optax.sgd(1.0), maximise.transform()).init(PARAMS)
    for value in [0.5, 0.6, 0.6]:  # the last does not improve: halve
        state = maximise.update(state, {"accuracy": value})
    assert float(optim.plateau_scale(state)) == 0.5
    with pytest.raises(ValueError, match=r"metric 'accuracy' is not among the evaluation metrics \['loss'\]"):
        maximise.update(state, {"loss": 1.0})
    with pytest.raises(ValueError, match=r"factor=1.5; expected factor in \(0, 1\)"):
        optim.Plateau(factor=1.5)


def test_plateau_schedule_from_config_scales_the_reported_learning_rate():
    config = OptimConfig("adam", 1e-2, schedule="plateau", plateau_metric="accuracy", plateau_mode="max",
                         plateau_factor=0.1, plateau_patience=1)
    plateau = optim.plateau(config)
    assert plateau == optim.Plateau("accuracy", "max", 0.1, 1)
    assert optim.plateau(OptimConfig()) is None
    tx = make_optimizer(config)
    state = tx.init(PARAMS)
    for value in [0.5, 0.4]:
        state = plateau.update(state, {"accuracy": value})
    assert float(optim.plateau_scale(state)) == pytest.approx(0.1)
    from jnn.train.step import _learning_rate
    assert float(_learning_rate(state)) == pytest.approx(1e-3)


def test_learning_rate_groups_scale_their_parameters_updates():
    params = {"backbone": {"kernel": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2, 2))}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = make_optimizer(OptimConfig("sgd", 0.1, momentum=0.0, lr_groups=(("^backbone/", 0.1),)))
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["backbone"]["kernel"], -0.01)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1)
    config = OptimConfig("adam", 1e-3, lr_groups=[["^backbone/", 0.5]])  # as JSON / --set give it
    assert config.lr_groups == (("^backbone/", 0.5),)
    with pytest.raises(ValueError, match=r"pattern '\^neck/' matches no parameter; the parameter paths are "
                                         r"\['backbone/kernel', 'head/kernel'\]"):
        make_optimizer(OptimConfig("sgd", 0.1, lr_groups=(("^neck/", 0.5),))).init(params)
    with pytest.raises(ValueError, match=r"pattern 'nope' matches no parameter"):
        make_optimizer(OptimConfig("sgd", 0.1, frozen=("nope",))).init(params)
    with pytest.raises(ValueError, match=r"lr_groups=.*expected lr_groups \(\(pattern, multiplier > 0\)"):
        OptimConfig("sgd", 0.1, lr_groups=(("^a", -1.0),))
