"""Transfer learning: pretrained weights matched by path with a report; frozen parameters stay
bitwise; LoRA adapters train alone, count what their rank implies, and merge exactly."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jnn
from jnn import lora as lora_lib
from jnn.transfer import flatten, load_pretrained

SPLITS = jnn.data.load("digits", val_fraction=0.1, seed=0)
X = SPLITS.train["inputs"][:64]
BATCH = {"inputs": X, "labels": SPLITS.train["labels"][:64]}


class Net(nn.Module):
    classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        x = nn.relu(nn.Dense(32, name="hidden")(x.reshape(len(x), -1)))
        return nn.Dense(self.classes, name="head")(x)


def _state(classes=10, tx=None, seed=0):
    return jnn.create_train_state(Net(classes), tx or optax.adam(1e-2), X[:1], seed)


def _trained():
    step = jax.jit(jnn.make_train_step("cross_entropy"))
    state = _state()
    for _ in range(20):
        state, _ = step(state, BATCH)
    return state


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    state = _trained()
    directory = tmp_path_factory.mktemp("pre") / "checkpoints"
    with jnn.Checkpointer(directory) as ckpt:
        ckpt.save(state)
    return state, directory


def test_load_from_a_checkpoint_into_a_new_head_reports_every_path(pretrained):
    trained, directory = pretrained
    fresh = _state(classes=5, seed=1)
    with pytest.raises(ValueError, match=r"2 array\(s\) of the source do not fit the model: params/head/bias: "
                                         r"source \(10,\) vs model \(5,\); params/head/kernel: source \(32, 10\) vs model \(32, 5\)"):
        load_pretrained(fresh, directory)
    state, report = load_pretrained(fresh, directory.parent, skip_mismatched=True)  # the run directory works too
    assert set(report.loaded) == {"params/conv/kernel", "params/conv/bias", "params/hidden/kernel", "params/hidden/bias"}
    assert set(report.initialised) == set() and len(report.mismatched) == 2 and report.ignored == ()
    assert "shape mismatch (kept the new initialisation): params/head/kernel: source (32, 10) vs model (32, 5)" in str(report)
    np.testing.assert_array_equal(state.params["conv"]["kernel"], trained.params["conv"]["kernel"])
    np.testing.assert_array_equal(state.params["head"]["kernel"], fresh.params["head"]["kernel"])


@pytest.mark.parametrize("kind", ["msgpack", "safetensors", "npz", "pytree"])
def test_load_from_files_and_pytrees(pretrained, tmp_path, kind):
    trained, _ = pretrained
    params = jax.tree.map(np.asarray, trained.params)
    flat = {k.replace("/", "."): v for k, v in flatten(params).items()}
    if kind == "msgpack":
        from flax import serialization
        source = tmp_path / "w.msgpack"
        source.write_bytes(serialization.to_bytes(params))
    elif kind == "safetensors":
        from safetensors.numpy import save_file
        source = tmp_path / "w.safetensors"
        save_file(flat, str(source))
    elif kind == "npz":
        source = tmp_path / "w.npz"
        np.savez(source, **flat)
    else:
        source = params
    state, report = load_pretrained(_state(seed=3), source)
    assert len(report.loaded) == 6 and not report.mismatched
    jax.tree.map(np.testing.assert_array_equal, state.params, params)


def test_frozen_parameters_stay_bitwise_while_the_head_moves(pretrained):
    trained, directory = pretrained
    tx = jnn.make_optimizer(jnn.OptimConfig("adam", 1e-2, frozen=("^conv/", "^hidden/")))
    state, _ = load_pretrained(_state(classes=5, tx=tx, seed=1), directory, skip_mismatched=True)
    step = jax.jit(jnn.make_train_step("cross_entropy"))
    labels = BATCH["labels"] % 5
    after = state
    for _ in range(5):
        after, _ = step(after, {"inputs": X, "labels": labels})
    for layer in ("conv", "hidden"):
        jax.tree.map(np.testing.assert_array_equal, after.params[layer], state.params[layer])
    assert not np.array_equal(after.params["head"]["kernel"], state.params["head"]["kernel"])


def test_lora_trains_only_adapters_of_the_rank_implied_size_and_merges_exactly(pretrained):
    trained, _ = pretrained
    lora = lora_lib.LoRA(rank=2, alpha=4.0, targets=("hidden/kernel$", "conv/kernel$"))
    state = lora_lib.apply(trained, lora, optax.adam(1e-2))
    # conv kernel (3, 3, 1, 8) -> a 9 x 8 matrix; hidden (512, 32): r * (in + out) each
    assert lora_lib.trainable_count(state) == 2 * (9 + 8) + 2 * (8 * 8 * 8 + 32)
    outputs = lambda s: s.model.apply(s.params, s.model_state, X, train=False)[0]  # noqa: E731
    np.testing.assert_array_equal(outputs(state), outputs(trained))  # B starts at zero
    adam_leaves = [x for x in jax.tree.leaves(state.opt_state) if hasattr(x, "size") and x.size > 1]
    assert sum(x.size for x in adam_leaves) == 2 * lora_lib.trainable_count(state)  # moments of the adapters only
    step = jax.jit(jnn.make_train_step("cross_entropy"))
    after = state
    for _ in range(10):
        after, metrics = step(after, BATCH)
    jax.tree.map(np.testing.assert_array_equal, after.params["base"], trained.params)  # the base is frozen
    assert float(jnp.abs(after.params["lora"]["hidden"]["kernel"]["b"]).max()) > 0
    merged = lora_lib.merge(after)
    direct = Net().apply({"params": merged}, X)
    np.testing.assert_allclose(direct, outputs(after), rtol=1e-5, atol=1e-5)
    assert not np.allclose(direct, outputs(trained), atol=1e-3)  # it learnt something
    np.testing.assert_allclose(after.apply_fn(after.variables, X), direct, rtol=1e-5, atol=1e-5)


def test_lora_with_a_checkpoint_round_trip(tmp_path, pretrained):
    trained, _ = pretrained
    state = lora_lib.apply(trained, lora_lib.LoRA(rank=2), optax.adam(1e-2))
    state, _ = jax.jit(jnn.make_train_step("cross_entropy"))(state, BATCH)
    with jnn.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(state)
        restored, _ = ckpt.restore(lora_lib.apply(trained, lora_lib.LoRA(rank=2), optax.adam(1e-2)))
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)


def test_bad_lora_and_transfer_inputs_are_refused(pretrained, tmp_path):
    trained, _ = pretrained
    with pytest.raises(ValueError, match=r"target 'dense/kernel' matches no parameter; the parameter paths are "
                                         r"\['conv/bias', 'conv/kernel', 'head/bias'"):
        lora_lib.apply(trained, lora_lib.LoRA(targets=("dense/kernel",)), optax.adam(1e-3))
    with pytest.raises(ValueError, match=r"rank=9 is larger than the layer conv/kernel of shape \(3, 3, 1, 8\) "
                                         r"\(as a matrix 9 x 8\); expected rank <= 8"):
        lora_lib.apply(trained, lora_lib.LoRA(rank=9), optax.adam(1e-3))
    with pytest.raises(ValueError, match=r"rank=0; expected rank an integer >= 1"):
        lora_lib.LoRA(rank=0)
    with pytest.raises(ValueError, match=r"select \['conv/bias'\], which are not kernels"):
        lora_lib.apply(trained, lora_lib.LoRA(targets=("conv/",)), optax.adam(1e-3))
    with pytest.raises(ValueError, match=r"does not exist; expected a jnn run directory"):
        load_pretrained(trained, tmp_path / "nothing.msgpack")
    with pytest.raises(ValueError, match=r"no array of the source matches the model"):
        load_pretrained(trained, {"other": {"kernel": np.zeros((2, 2))}})


def test_lora_refuses_an_optimizer_that_prunes(pretrained):
    """Pruning under LoRA would prune the adapters and report a sparsity far from the target."""
    trained, _ = pretrained
    pruning_tx = optax.chain(optax.adam(1e-3), jnn.pruning.Pruning(0.5, end_step=4).transform())
    with pytest.raises(ValueError, match=r"the optimizer prunes .*it would prune the adapters, not the model"):
        lora_lib.apply(trained, lora_lib.LoRA(rank=2), pruning_tx)
