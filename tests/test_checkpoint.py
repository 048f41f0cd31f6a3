"""Orbax checkpoints: exact round trip of the whole state, retention, fallback, bad directories."""
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jnn
from jnn.checkpoint import Checkpointer, CheckpointError
from tests._tiny import TinyBNDropout, TinyMLP

CE = optax.softmax_cross_entropy_with_integer_labels


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.normal(size=(16, 5)).astype(np.float32), "labels": rng.integers(0, 3, 16).astype(np.int32)}


def _trained(steps=3, model=None, tx=None):
    state = jnn.create_train_state(model or TinyBNDropout(), tx or jnn.make_optimizer(name="adamw", learning_rate=1e-2),
                                   _batch()["inputs"][:1], jax.random.key(0))
    step = jax.jit(jnn.make_train_step(CE))
    for i in range(steps):
        state, _ = step(state, _batch(i))
    return state


def _fresh_template():
    return _trained(steps=0)


def test_round_trip_is_exact_including_rng_and_batch_stats(tmp_path):
    state = _trained()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(state, data_state={"epoch": 2, "position": 17})
        restored, data_state = ckpt.restore(_fresh_template())
    assert data_state == {"epoch": 2, "position": 17}
    assert int(restored.step) == 3
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
    chex.assert_trees_all_equal(restored.model_state, state.model_state)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
    # The restored state steps exactly like the original.
    step = jax.jit(jnn.make_train_step(CE))
    a, _ = step(state, _batch(9))
    b, _ = step(restored, _batch(9))
    chex.assert_trees_all_equal(a.params, b.params)


def test_restore_into_a_donated_template_and_missing_step(tmp_path):
    state = _trained(steps=2)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(state)
        template = _fresh_template()
        jax.jit(jnn.make_train_step(CE), donate_argnums=0)(template, _batch())  # deletes template's buffers
        restored, _ = ckpt.restore(template)
        chex.assert_trees_all_equal(restored.params, state.params)
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 5 .*available steps: \[2\]"):
            ckpt.restore(template, step=5)


def test_nan_metric_is_never_best(tmp_path):
    state = _trained(steps=0)
    with Checkpointer(tmp_path / "ckpt", keep=1, best_metric="accuracy") as ckpt:
        for s, acc in {1: 0.5, 2: float("nan"), 3: 0.4}.items():
            ckpt.save(state.replace(step=jnp.asarray(s, jnp.int32)), metrics={"accuracy": acc})
        assert ckpt.best_step() == 1
        assert ckpt.all_steps() == [1, 3]


def test_keeps_latest_k_and_the_best(tmp_path):
    state = _trained(steps=0)
    accuracies = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.65}
    with Checkpointer(tmp_path / "ckpt", keep=2, best_metric="accuracy") as ckpt:
        for s, acc in accuracies.items():
            ckpt.save(state.replace(step=jnp.asarray(s, jnp.int32)), metrics={"accuracy": acc, "loss": 1 - acc})
        assert ckpt.all_steps() == [2, 4, 5]
        assert ckpt.best_step() == 2
    with Checkpointer(tmp_path / "min", keep=1, best_metric="loss", best_mode="min") as ckpt:
        for s, acc in accuracies.items():
            ckpt.save(state.replace(step=jnp.asarray(s, jnp.int32)), metrics={"accuracy": acc, "loss": 1 - acc})
        assert ckpt.all_steps() == [2, 5]


def test_restore_falls_back_to_an_older_step_when_newest_is_damaged(tmp_path):
    state = _trained(steps=0)
    with Checkpointer(tmp_path / "ckpt", keep=3) as ckpt:
        for s in (1, 2):
            ckpt.save(state.replace(step=jnp.asarray(s, jnp.int32)))
    # Simulate a kill during deletion: the newest step's array data is gone but the folder is listed.
    shutil.rmtree(tmp_path / "ckpt" / "2" / "state")
    with Checkpointer(tmp_path / "ckpt", keep=3) as ckpt:
        restored, _ = ckpt.restore(_fresh_template())
    assert int(restored.step) == 1


def test_missing_and_incompatible_checkpoints_say_so(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint found in .*empty"):
            ckpt.restore(_fresh_template())
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(_trained(steps=1))
        other = jnn.create_train_state(TinyMLP(width=7), optax.sgd(0.1), _batch()["inputs"][:1], jax.random.key(0))
        with pytest.raises(CheckpointError, match="could be restored into the current model"):
            ckpt.restore(other)
    assert os.listdir(tmp_path / "ckpt"), "nothing already written is deleted on a failed restore"


# ---- restore onto another topology: the restored arrays are placed like the template ----

_LAYOUTS = {"single": None, "jit-8": (8, False), "jit-4": (4, False), "fsdp-8": (8, True), "fsdp-4": (4, True)}


def _placed(state, layout):
    """`state` and a train step for it, in `layout` (one device, or replicated / FSDP over N)."""
    if _LAYOUTS[layout] is None:
        return state, jax.jit(jnn.make_train_step(CE))
    devices, fsdp = _LAYOUTS[layout]
    step = jnn.parallel.data_parallel(jnn.make_train_step(CE), jnn.parallel.make_mesh(data=devices), fsdp=fsdp)
    return step.shard_state(state), step


def _wide_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.normal(size=(16, 8)).astype(np.float32), "labels": rng.integers(0, 4, 16).astype(np.int32)}


def _wide_state():
    return jnn.create_train_state(TinyMLP(classes=4, width=16), optax.adam(1e-2), _wide_batch()["inputs"][:1], 0)


@pytest.mark.parametrize("saved, restored", [
    ("jit-8", "single"), ("jit-8", "jit-4"), ("single", "jit-8"), ("fsdp-8", "jit-8"),
    ("jit-8", "fsdp-8"), ("fsdp-8", "single"), ("fsdp-8", "fsdp-4"), ("single", "fsdp-8")])
def test_restore_onto_another_topology_is_exact_and_steps_in_place(tmp_path, saved, restored):
    state, step = _placed(_wide_state(), saved)
    for i in range(2):
        state, _ = step(state, _wide_batch(i))
    want = jnn.parallel.to_host(jnn.checkpoint._arrays(state))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(state)
        template, new_step = _placed(_wide_state(), restored)
        shardings = jax.tree.map(lambda x: x.sharding, jnn.checkpoint._arrays(template))
        got, _ = ckpt.restore(template)
    chex.assert_trees_all_equal(jnn.parallel.to_host(jnn.checkpoint._arrays(got)), want)
    placed = jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), jnn.checkpoint._arrays(got), shardings)
    assert all(jax.tree.leaves(placed)), placed
    got, metrics = new_step(got, _wide_batch(2))  # no shard_state needed
    assert np.isfinite(float(metrics["loss"]))


def test_restore_into_a_changed_model_names_each_parameter_path_with_both_shapes(tmp_path):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(_trained(steps=1, model=TinyMLP(), tx=optax.sgd(0.1)))
        other = jnn.create_train_state(TinyMLP(width=7), optax.sgd(0.1), _batch()["inputs"][:1], 0)
        with pytest.raises(CheckpointError, match=r"params/Dense_0/kernel: checkpoint \(5, 16\) "
                                                  r"vs model/optimizer \(5, 7\)"):
            ckpt.restore(other)
