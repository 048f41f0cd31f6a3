"""flax.nnx modules through jnn: state, step, parallel paths, checkpoints, the way back to a module."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jnn
from jnn import parallel
from tests import tolerances as tol

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

CE = optax.softmax_cross_entropy_with_integer_labels
F, C = 6, 4


class MLP(nnx.Module):
    """As in Flax's NNX guide: Linear, BatchNorm, Dropout, Linear."""

    def __init__(self, rngs: nnx.Rngs, rate: float = 0.0):
        # No bias before BatchNorm: its gradient is zero in exact arithmetic and only rounding noise
        # in float32, which Adam would scale up differently for each reduction order.
        self.linear1 = nnx.Linear(F, 16, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(rate, rngs=rngs)
        self.linear2 = nnx.Linear(16, C, rngs=rngs)

    def __call__(self, x):
        return self.linear2(self.dropout(nnx.relu(self.bn(self.linear1(x)))))


class CallRngsMLP(nnx.Module):
    """As in Flax's NNX randomness guide and MNIST example: Dropout holds no rngs; `__call__` takes them."""

    def __init__(self, rngs: nnx.Rngs, rate: float = 0.3):
        self.linear1 = nnx.Linear(F, 16, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(rate)
        self.linear2 = nnx.Linear(16, C, rngs=rngs)

    def __call__(self, x, *, rngs: nnx.Rngs):
        return self.linear2(self.dropout(nnx.relu(self.bn(self.linear1(x))), rngs=rngs))


def _batch(seed=0, n=32):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.normal(size=(n, F)).astype(np.float32),
            "labels": rng.integers(0, C, size=n).astype(np.int32)}


def _state(module, tx=None):
    return jnn.create_train_state(module, tx or optax.sgd(0.1), _batch()["inputs"][:1], 0)


def test_state_starts_from_the_modules_own_parameters_and_leaves_it_unchanged():
    module = MLP(nnx.Rngs(0))
    kernel = np.asarray(module.linear1.kernel[...])
    state = _state(module)
    np.testing.assert_array_equal(state.params["linear1"]["kernel"], kernel)
    assert set(state.model_state) == {"bn"} and set(state.model_state["bn"]) == {"mean", "var"}
    state, _ = jax.jit(jnn.make_train_step(CE), donate_argnums=0)(state, _batch())
    np.testing.assert_array_equal(np.asarray(module.linear1.kernel[...]), kernel)  # not mutated, not donated


def test_ten_sgd_steps_equal_flax_own_nnx_loop():
    ours = _state(MLP(nnx.Rngs(0)))
    step = jax.jit(jnn.make_train_step(CE, metrics=("loss",)), donate_argnums=0)

    model = MLP(nnx.Rngs(0))
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def flax_step(model, optimizer, x, y):
        def loss_fn(model):
            return CE(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    for i in range(10):
        batch = _batch(i)
        ours, metrics = step(ours, batch)
        loss = flax_step(model, optimizer, batch["inputs"], batch["labels"])
        np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=tol.F32_REORDER_RTOL)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    chex.assert_trees_all_close(jax.device_get(ours.params), nnx.to_pure_dict(params),
                                rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    bn = nnx.to_pure_dict(rest)["bn"]
    chex.assert_trees_all_close(jax.device_get(ours.model_state["bn"]), {"mean": bn["mean"], "var": bn["var"]},
                                rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)


def test_dropout_trains_with_the_steps_key_and_evaluation_is_deterministic():
    state = _state(MLP(nnx.Rngs(0), rate=0.5))
    assert state.model.rng_tags == ("default",)
    x = _batch()["inputs"]
    a, _ = state.model.apply(state.params, state.model_state, x, train=True, rng=jax.random.key(1))
    b, _ = state.model.apply(state.params, state.model_state, x, train=True, rng=jax.random.key(2))
    assert not np.allclose(a, b)
    eval_step = jax.jit(jnn.make_eval_step("cross_entropy"))
    state, _ = jax.jit(jnn.make_train_step(CE))(state, _batch())
    first, second = eval_step(state, _batch()), eval_step(state.replace(step=state.step + 5), _batch())
    chex.assert_trees_all_equal(jax.device_get(first), jax.device_get(second))


def test_to_nnx_gives_the_trained_module_back():
    state = _state(MLP(nnx.Rngs(0)))
    state, _ = jax.jit(jnn.make_train_step(CE))(state, _batch())
    module = jnn.to_nnx(state)
    np.testing.assert_array_equal(np.asarray(module.linear1.kernel[...]), state.params["linear1"]["kernel"])
    module.eval()
    outputs, _ = state.model.apply(state.params, state.model_state, _batch()["inputs"], train=False)
    np.testing.assert_allclose(module(_batch()["inputs"]), outputs, rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)
    with pytest.raises(ValueError, match="linen"):
        linen = jnn.models.MLP(hidden_sizes=(8,), num_classes=C)
        jnn.to_nnx(jnn.create_train_state(linen, optax.sgd(0.1), _batch()["inputs"][:1], 0))


def _single(steps=3):
    state = _state(MLP(nnx.Rngs(0)), optax.adam(1e-2))
    step = jax.jit(jnn.make_train_step(CE))
    for i in range(steps):
        state, _ = step(state, _batch(i, n=64))
    return jax.device_get((state.params, state.model_state))


@pytest.mark.parametrize("mode", ["jit", "fsdp", "pmap", "shard_map"])
def test_every_parallel_path_equals_single_device(mode):
    state = _state(MLP(nnx.Rngs(0)), optax.adam(1e-2))
    if mode == "pmap":
        step = parallel.pmap_train_step(loss_fn=CE)
        pstate = step.replicate(state)
        for i in range(3):
            pstate, _ = step(pstate, step.shard_batch(_batch(i, n=64)))
        got = jax.device_get(parallel.pmap_unreplicate((pstate.params, pstate.model_state)))
    else:
        mesh = parallel.make_mesh()
        step = parallel.shard_map_train_step(loss_fn=CE, mesh=mesh) if mode == "shard_map" else \
            parallel.data_parallel(jnn.make_train_step(CE), mesh, fsdp=mode == "fsdp")
        pstate = step.shard_state(state)
        for i in range(3):
            pstate, _ = step(pstate, step.shard_batch(_batch(i, n=64)))
        got = parallel.to_host((pstate.params, pstate.model_state))
    chex.assert_trees_all_close(got, _single(), rtol=tol.PARALLEL_RTOL, atol=tol.PARALLEL_ATOL)


def test_vmap_over_stacked_nnx_states():
    tx = optax.sgd(0.1)  # one static optimizer, as for a stacked linen ensemble
    states = [_state(MLP(nnx.Rngs(seed)), tx) for seed in (0, 1)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    out, metrics = jax.jit(jnn.ensemble_train_step(jnn.make_train_step(CE)))(stacked, _batch())
    single, single_metrics = jax.jit(jnn.make_train_step(CE))(states[1], _batch())
    assert metrics["loss"].shape == (2,)
    chex.assert_trees_all_close(jax.device_get(jnn.vmap.ensemble_member(out.params, 1)),
                                jax.device_get(single.params), rtol=tol.F32_REORDER_RTOL, atol=tol.F32_REORDER_ATOL)


def test_call_time_rngs_draw_from_the_steps_key():
    """`__call__(self, x, *, rngs)`: jnn passes an nnx.Rngs whose streams derive from the step key."""
    state = _state(CallRngsMLP(nnx.Rngs(0)))
    assert state.model.call_rngs and state.model.rng_tags == ()
    x = _batch()["inputs"]
    a, _ = state.model.apply(state.params, state.model_state, x, train=True, rng=jax.random.key(1))
    b, _ = state.model.apply(state.params, state.model_state, x, train=True, rng=jax.random.key(2))
    again, _ = state.model.apply(state.params, state.model_state, x, train=True, rng=jax.random.key(1))
    assert not np.allclose(a, b)  # a new mask for a new step key
    np.testing.assert_array_equal(a, again)  # the same mask for the same key
    eval_step = jax.jit(jnn.make_eval_step("cross_entropy"))
    state, _ = jax.jit(jnn.make_train_step(CE))(state, _batch())
    first, second = eval_step(state, _batch()), eval_step(state.replace(step=state.step + 5), _batch())
    chex.assert_trees_all_equal(jax.device_get(first), jax.device_get(second))
    assert jnn.to_nnx(state)(x[:2], rngs=nnx.Rngs(0)).shape == (2, C)


@pytest.mark.parametrize("module", [MLP, CallRngsMLP])
def test_fit_checkpoint_and_bitwise_resume(tmp_path, module):
    data = {k: np.concatenate([_batch(i)[k] for i in range(4)]) for k in ("inputs", "labels")}

    def run(num_steps, stop_at=None, restore=False):
        state = _state(module(nnx.Rngs(0), rate=0.3), optax.adam(1e-2))
        with jnn.Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
            data_state = None
            if restore:
                state, data_state = ckpt.restore(state)
            result = jnn.fit(state, jnn.data.Pipeline(data, 16, seed=0), num_steps=num_steps,
                             loss_fn="cross_entropy", checkpointer=ckpt, stop_at=stop_at,
                             data_state=data_state, log_every=2)
        return jax.device_get((result.state.params, result.state.model_state))

    whole = run(8)
    import shutil
    shutil.rmtree(tmp_path / "ckpt")
    run(8, stop_at=4)
    chex.assert_trees_all_equal(run(8, restore=True), whole)


def test_jnn_testing_checks_an_nnx_model():
    batch = _batch()
    jnn.testing.check_model(MLP(nnx.Rngs(0), rate=0.2), batch["inputs"][:8], batch["labels"][:8])


def test_nnx_only_options_are_refused():
    with pytest.raises(ValueError, match="linen modules only"):
        jnn.create_train_state(MLP(nnx.Rngs(0)), optax.sgd(0.1), _batch()["inputs"][:1], 0, train_kwarg="train")
    with pytest.raises(ValueError, match="already initialised"):
        jnn.create_ensemble(MLP(nnx.Rngs(0)), optax.sgd(0.1), _batch()["inputs"][:1], 0, 2)


def test_a_linen_run_does_not_import_flax_nnx_and_an_nnx_module_made_later_is_still_recognised():
    """`create_train_state` tells an nnx module apart without importing flax.nnx (0.15 s of every
    `jnn train`): a program that made one imported it already. Here a linen state is made first, then
    flax.nnx is imported and an nnx module made and trained, in the same fresh process."""
    import subprocess
    import sys

    code = (
        "import sys, optax, jax.numpy as jnp, flax.linen as nn, jnn\n"
        "import jnn.experiment, jnn.cli, jnn.parallel\n"
        "state = jnn.create_train_state(nn.Dense(2), optax.sgd(0.1), jnp.ones((1, 3)), 0)\n"
        "assert 'flax.nnx' not in sys.modules, 'a linen state imported flax.nnx'\n"
        "from flax import nnx\n"
        "state = jnn.create_train_state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), optax.sgd(0.1), jnp.ones((1, 3)), 0)\n"
        "assert state.model.kind == 'nnx', state.model\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
