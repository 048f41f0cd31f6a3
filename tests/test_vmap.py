"""vmap modes: per-example gradients, DP-SGD, and ensembles of K models in one step."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jnn
from jnn import vmap as jvmap
from tests import tolerances as tol
from tests._parallel_models import BNNet, CE, MLP, batches
from tests._tiny import TinyBNDropout

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

BATCHES = batches(steps=10, batch_size=16)
X0 = BATCHES[0]["inputs"][:1]


@functools.cache
def _mlp_state():
    return jnn.create_train_state(MLP(), optax.sgd(0.1), X0, jax.random.key(0))


def _state(model=None, tx=None):
    """A state for `model` (default the cached MLP) with optimizer `tx` (default SGD)."""
    state = _mlp_state() if model is None else jnn.create_train_state(model, optax.sgd(0.1), X0, 0)
    return state if tx is None else state.replace(tx=tx, opt_state=tx.init(state.params))


@functools.partial(jax.jit, static_argnums=2)
def _batch_grad(state, batch, reduce):
    def loss(params):
        return reduce(CE(state.apply_fn({"params": params}, batch["inputs"]), batch["labels"]))
    return jax.grad(loss)(state.params)


def test_per_example_grads_sum_to_the_batch_gradient():
    state, batch = _state(), BATCHES[0]
    per_example = jax.jit(lambda s, b: jvmap.per_example_grads(CE, s, b))(state, batch)
    assert per_example["Dense_0"]["kernel"].shape == (16,) + state.params["Dense_0"]["kernel"].shape
    summed = jax.tree.map(lambda g: g.sum(0), per_example)
    chex.assert_trees_all_close(summed, _batch_grad(state, batch, jnp.sum),
                                rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    mean = jax.tree.map(lambda g: g.mean(0), per_example)
    chex.assert_trees_all_close(mean, _batch_grad(state, batch, jnp.mean),
                                rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    one = jax.tree.map(lambda g: g[3], per_example)  # and each row is that example's gradient
    only3 = {k: v[3:4] for k, v in batch.items()}
    chex.assert_trees_all_close(one, _batch_grad(state, only3, jnp.sum),
                                rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)


def test_per_example_grads_refuse_batch_norm_in_training_mode():
    state = _state(BNNet())
    with pytest.raises(ValueError, match="BatchNorm mixes the examples.*train=False"):
        jvmap.per_example_grads(CE, state, BATCHES[0])
    grads = jax.jit(lambda s, b: jvmap.per_example_grads(CE, s, b, train=False))(state, BATCHES[0])
    assert grads["Dense_1"]["kernel"].shape[0] == 16


CLIP, LR = 0.05, 0.1


@functools.cache
def _dp(noise: float):
    """(state, jitted DP step) for a noise multiplier; cached so each optimizer compiles once."""
    # optax.contrib.dpsgd(lr, clip, noise, seed) is this chain, but its `seed` argument warns.
    tx = optax.chain(optax.contrib.differentially_private_aggregate(CLIP, noise, key=jax.random.key(0)),
                     optax.sgd(LR))
    return _state(tx=tx), jax.jit(jnn.vmap.make_dp_train_step(CE))


def test_dp_sgd_clips_sums_and_divides_by_the_batch():
    (state, step), batch = _dp(0.0), BATCHES[0]
    new, metrics = step(state, batch)

    @jax.jit
    def by_hand(state, batch):  # clip each example's gradient, average, SGD step
        per_example = jvmap.per_example_grads(CE, state, batch)
        norms = jax.vmap(optax.tree.norm)(per_example)  # (B,)
        scale = jnp.minimum(1.0, CLIP / norms)
        return norms, jax.tree.map(
            lambda p, g: p - LR * jnp.mean(g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), 0),
            state.params, per_example)

    norms, want = by_hand(state, batch)
    assert float(jnp.min(norms)) > CLIP  # so every example is clipped
    chex.assert_trees_all_close(new.params, want, rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    np.testing.assert_allclose(metrics["per_example_grad_norm"], jnp.mean(norms), rtol=tol.F32_REORDER_RTOL)


def test_dp_sgd_noise_is_seeded_and_scaled():
    quiet_state, quiet_step = _dp(0.0)
    noisy_state, noisy_step = _dp(1.0)
    quiet, _ = quiet_step(quiet_state, BATCHES[0])
    noisy, _ = noisy_step(noisy_state, BATCHES[0])
    again, _ = noisy_step(noisy_state, BATCHES[0])  # not donated: the same state and noise key again
    chex.assert_trees_all_equal(noisy.params, again.params)
    # noise std per coordinate: lr * noise_multiplier * clip / B
    diff = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(noisy.params), jax.tree.leaves(quiet.params))])
    std = LR * 1.0 * CLIP / 16
    assert 0.8 * std < diff.std() < 1.2 * std


def test_dp_step_needs_the_dp_optimizer():
    with pytest.raises(ValueError, match="differentially_private_aggregate"):
        jnn.vmap.make_dp_train_step(CE)(_state(), BATCHES[0])


K = 2
# SGD with momentum, not Adam: TinyBNDropout's Dense before BatchNorm has a bias whose gradient is
# zero up to rounding, and Adam would turn that rounding noise (which differs between the batched
# and unbatched matmuls) into full-size steps.
ENSEMBLE_TX = optax.sgd(0.05, momentum=0.9)
ENSEMBLE_MODEL = TinyBNDropout(classes=10)


@functools.cache
def _singles():
    """K separately created models with the member keys (cached: the steps here do not donate)."""
    keys = jvmap.ensemble_keys(7, K)
    return [jnn.create_train_state(ENSEMBLE_MODEL, ENSEMBLE_TX, X0, keys[i]) for i in range(K)]


@functools.cache
def _ensemble():
    return jvmap.create_ensemble(ENSEMBLE_MODEL, ENSEMBLE_TX, X0, 7, K)


def test_ensemble_members_equal_separate_models():
    stacked = _ensemble()
    assert stacked.params["Dense_0"]["kernel"].shape[0] == K
    singles = _singles()
    host = jax.tree.map(np.asarray, (stacked.variables, jax.random.key_data(stacked.rng)))
    for i in range(K):  # initialisation under vmap draws exactly the same numbers
        chex.assert_trees_all_equal(jvmap.ensemble_member(host, i),
                                    (singles[i].variables, jax.random.key_data(singles[i].rng)))

    ens_step = jax.jit(jvmap.ensemble_train_step(jnn.make_train_step(CE)))  # no donation: cached
    one_step = jax.jit(jnn.make_train_step(CE))
    for batch in BATCHES:
        stacked, metrics = ens_step(stacked, batch)
        singles = [one_step(s, batch)[0] for s in singles]
    assert metrics["loss"].shape == (K,)
    host = jax.tree.map(np.asarray, stacked.variables)
    for i in range(K):
        chex.assert_trees_all_close(jvmap.ensemble_member(host, i), singles[i].variables,
                                    rtol=tol.PARALLEL_RTOL, atol=tol.PARALLEL_ATOL)
    # members differ: own initialisation, own dropout key, own BatchNorm statistics
    means = host["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(means[0], means[1])


def test_ensemble_with_one_batch_per_member():
    stacked = _ensemble()
    per_member = jax.tree.map(lambda *xs: np.stack(xs), *BATCHES[:K])  # (K, B, ...)
    step = jax.jit(jvmap.ensemble_train_step(jnn.make_train_step(CE), shared_batch=False))
    stacked, _ = step(stacked, per_member)
    one_step = jax.jit(jnn.make_train_step(CE))
    host = jax.tree.map(np.asarray, stacked.variables)
    for i, single in enumerate(_singles()):
        single, _ = one_step(single, BATCHES[i])
        chex.assert_trees_all_close(jvmap.ensemble_member(host, i), single.variables,
                                    rtol=tol.PARALLEL_RTOL, atol=tol.PARALLEL_ATOL)
