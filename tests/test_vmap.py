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

BATCHES = batches(steps=10, batch_size=16)
X0 = BATCHES[0]["inputs"][:1]


@functools.cache
def _mlp_state():
    return jnn.create_train_state(MLP(), optax.sgd(0.1), X0, jax.random.key(0))


def _state(model=None, tx=None):
    """A state for `model` (default the cached MLP) with optimizer `tx` (default SGD)."""
    state = _mlp_state() if model is None else jnn.create_train_state(model, optax.sgd(0.1), X0, 0)
    return state if tx is None else state.replace(tx=tx, opt_state=tx.init(state.params))


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
    grads = jvmap.per_example_grads(CE, state, BATCHES[0], train=False)
    assert grads["Dense_1"]["kernel"].shape[0] == 16


def _dp_state(clip, noise, lr=0.1):
    tx = optax.contrib.dpsgd(lr, l2_norm_clip=clip, noise_multiplier=noise, seed=0)
    # (optax 0.2.8's dpsgd still takes `seed` and warns it is deprecated; its transform takes key=)
    return _state(tx=tx)


def test_dp_sgd_clips_sums_and_divides_by_the_batch():
    clip, lr, batch = 0.05, 0.1, BATCHES[0]
    state = _dp_state(clip, 0.0, lr)
    new, metrics = jax.jit(jnn.vmap.make_dp_train_step(CE))(state, batch)
    per_example = jvmap.per_example_grads(CE, state, batch)
    norms = jax.vmap(optax.tree.norm)(per_example)  # (B,)
    assert float(jnp.min(norms)) > clip  # so every example is clipped
    scale = jnp.minimum(1.0, clip / norms)
    want = jax.tree.map(lambda p, g: p - lr * jnp.mean(g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), 0),
                        state.params, per_example)
    chex.assert_trees_all_close(new.params, want, rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    np.testing.assert_allclose(metrics["per_example_grad_norm"], jnp.mean(norms), rtol=tol.F32_REORDER_RTOL)


def test_dp_sgd_noise_is_seeded_and_scaled():
    step = jax.jit(jnn.vmap.make_dp_train_step(CE))
    quiet, _ = step(_dp_state(1.0, 0.0), BATCHES[0])
    noisy, _ = step(_dp_state(1.0, 1.0), BATCHES[0])
    again, _ = step(_dp_state(1.0, 1.0), BATCHES[0])
    chex.assert_trees_all_equal(noisy.params, again.params)
    # noise std per coordinate: lr * noise_multiplier * clip / B = 0.1 * 1 * 1 / 16
    diff = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(noisy.params), jax.tree.leaves(quiet.params))])
    assert 0.8 * 0.1 / 16 < diff.std() < 1.2 * 0.1 / 16


def test_dp_step_needs_the_dp_optimizer():
    with pytest.raises(ValueError, match="differentially_private_aggregate"):
        jnn.vmap.make_dp_train_step(CE)(_state(), BATCHES[0])


K = 3
# SGD with momentum, not Adam: TinyBNDropout's Dense before BatchNorm has a bias whose gradient is
# zero up to rounding, and Adam would turn that rounding noise (which differs between the batched
# and unbatched matmuls) into full-size steps.
ENSEMBLE_TX = optax.sgd(0.05, momentum=0.9)
ENSEMBLE_MODEL = TinyBNDropout(classes=10)


@functools.cache
def _singles():
    """K separately created models with the member keys; host copies, so runs may donate."""
    keys = jvmap.ensemble_keys(7, K)
    return [jnn.create_train_state(ENSEMBLE_MODEL, ENSEMBLE_TX, X0, keys[i]) for i in range(K)]


def test_ensemble_members_equal_separate_models():
    stacked = jvmap.create_ensemble(ENSEMBLE_MODEL, ENSEMBLE_TX, X0, 7, K)
    assert stacked.params["Dense_0"]["kernel"].shape[0] == K
    singles = _singles()
    for i in range(K):  # initialisation under vmap draws exactly the same numbers
        chex.assert_trees_all_equal(jvmap.ensemble_member(stacked, i).variables, singles[i].variables)
        chex.assert_trees_all_equal(jax.random.key_data(jvmap.ensemble_member(stacked, i).rng),
                                    jax.random.key_data(singles[i].rng))

    ens_step = jax.jit(jvmap.ensemble_train_step(jnn.make_train_step(CE)), donate_argnums=0)
    one_step = jax.jit(jnn.make_train_step(CE))
    for batch in BATCHES:
        stacked, metrics = ens_step(stacked, batch)
        singles = [one_step(s, batch)[0] for s in singles]
    assert metrics["loss"].shape == (K,)
    for i in range(K):
        member = jvmap.ensemble_member(stacked, i)
        chex.assert_trees_all_close(member.variables, singles[i].variables,
                                    rtol=tol.PARALLEL_RTOL, atol=tol.PARALLEL_ATOL)
    # members differ: own initialisation, own dropout key, own BatchNorm statistics
    means = stacked.model_state["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(means[0], means[1])


def test_ensemble_with_one_batch_per_member():
    stacked = jvmap.create_ensemble(ENSEMBLE_MODEL, ENSEMBLE_TX, X0, 7, K)
    per_member = jax.tree.map(lambda *xs: np.stack(xs), *BATCHES[:K])  # (K, B, ...)
    step = jax.jit(jvmap.ensemble_train_step(jnn.make_train_step(CE), shared_batch=False))
    stacked, _ = step(stacked, per_member)
    one_step = jax.jit(jnn.make_train_step(CE))
    for i, single in enumerate(_singles()):
        single, _ = one_step(single, BATCHES[i])
        chex.assert_trees_all_close(jvmap.ensemble_member(stacked, i).variables, single.variables,
                                    rtol=tol.PARALLEL_RTOL, atol=tol.PARALLEL_ATOL)
