"""Users' own models, in every convention flax allows, through jnn's state and step (jnn/train/model.py).

Each test is one row of the model-compatibility table: a model a researcher writes every day that
must train through `create_train_state` + `make_train_step`, or be refused with a clear error.
"""
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jnn
from jnn import parallel
from tests import tolerances as tol

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

CE = optax.softmax_cross_entropy_with_integer_labels
B, F, C = 16, 6, 4


def _batch(seed=0, n=B):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.normal(size=(n, F)).astype(np.float32),
            "labels": rng.integers(0, C, size=n).astype(np.int32)}


def _train(state, steps=3, loss="cross_entropy", seed=0):
    step = jax.jit(jnn.make_train_step(loss), donate_argnums=0)
    metrics = None
    for i in range(steps):
        state, metrics = step(state, _batch(seed + i))
    return state, metrics


# ---- rng streams and per-call variables (Flax's VAE draws noise with make_rng) ----


class NoisyCounter(nn.Module):
    """Draws from an rng stream on every call (like Flax's VAE example) and counts its calls."""

    @nn.compact
    def __call__(self, x):
        count = self.variable("cache", "count", lambda: jnp.zeros((), jnp.int32))
        count.value += 1
        noise = jax.random.normal(self.make_rng("noise"), x.shape)
        return nn.Dense(C)(x + 0.1 * noise)


def test_model_drawing_an_rng_stream_on_every_call_trains():
    state = jnn.create_train_state(NoisyCounter(), optax.sgd(0.1), _batch()["inputs"][:1], 0)
    assert state.model.rng_streams == ("noise",) and state.model.collections == ("cache",)
    assert state.model_state["cache"]["count"].dtype == jnp.int32
    start = int(state.model_state["cache"]["count"])  # init ran the model once
    state, metrics = _train(state, steps=3)
    assert int(state.model_state["cache"]["count"]) == start + 3 and np.isfinite(metrics["loss"])
    # The noise is drawn from the step's key: two steps from the same state are equal, two
    # different steps differ.
    eval_step = jax.jit(jnn.make_eval_step("cross_entropy"))
    first = jax.device_get(eval_step(state, _batch()))
    assert jax.device_get(eval_step(state, _batch()))["loss"] == first["loss"]


def test_rng_streams_are_derived_per_name_from_the_step_key():
    state = jnn.create_train_state(NoisyCounter(), optax.sgd(0.1), _batch()["inputs"][:1], 0)
    key = jax.random.fold_in(state.rng, state.step)
    noise_key = jnn.train.model.stream_key(key, "noise")
    outputs, _ = state.model.apply(state.params, state.model_state, _batch()["inputs"], train=True, rng=key)
    manual = NoisyCounter().apply(state.variables, _batch()["inputs"], rngs={"noise": noise_key},
                                  mutable=["cache"])[0]
    chex.assert_trees_all_equal(outputs, manual)


# ---- the train/eval keyword ----


class KerasStyle(nn.Module):
    """`training=` as in Keras (and `is_training=` as in Haiku)."""

    @nn.compact
    def __call__(self, x, training=False):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)
        x = nn.Dropout(0.5, deterministic=not training)(x)
        return nn.Dense(C)(x)


class RunningAverageStyle(nn.Module):
    """The inverted form: `use_running_average=True` means evaluation."""

    @nn.compact
    def __call__(self, x, use_running_average: bool = True):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=use_running_average, momentum=0.5)(x)
        return nn.Dense(C)(x)


class CustomFlag(nn.Module):
    @nn.compact
    def __call__(self, x, mode_is_fit=False):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not mode_is_fit, momentum=0.5)(x)
        return nn.Dense(C)(x)


class NoFlag(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        return nn.Dense(C)(nn.BatchNorm(use_running_average=True)(x))


@pytest.mark.parametrize("model, kwargs", [(KerasStyle(), {}), (RunningAverageStyle(), {}),
                                           (CustomFlag(), {"train_kwarg": "mode_is_fit"})],
                         ids=["training", "use_running_average", "named"])
def test_mode_keywords_switch_batch_norm_to_training(model, kwargs):
    state = jnn.create_train_state(model, optax.sgd(0.1), _batch()["inputs"][:1], 0, **kwargs)
    before = jax.device_get(state.model_state["batch_stats"])
    state, _ = _train(state, steps=1)
    after = jax.device_get(state.model_state["batch_stats"])
    assert not np.allclose(before["BatchNorm_0"]["mean"], after["BatchNorm_0"]["mean"])


def test_keras_training_keyword_turns_dropout_on_only_in_training():
    state = jnn.create_train_state(KerasStyle(), optax.sgd(0.1), _batch()["inputs"][:1], 0)
    x, key = _batch()["inputs"], jax.random.key(3)
    train_out, _ = state.model.apply(state.params, state.model_state, x, train=True, rng=key)
    eval_out, _ = state.model.apply(state.params, state.model_state, x, train=False, rng=key)
    assert float(jnp.mean(train_out == 0.0)) == 0.0  # logits; dropout shows as a different output
    assert not np.allclose(train_out, eval_out)
    chex.assert_trees_all_equal(eval_out, state.model.apply(state.params, state.model_state, x, train=False,
                                                            rng=jax.random.key(4))[0])


def test_model_with_batch_norm_and_no_mode_keyword_warns_and_none_silences():
    x = _batch()["inputs"][:1]
    with pytest.warns(UserWarning, match="train_kwarg"):
        jnn.create_train_state(NoFlag(), optax.sgd(0.1), x, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jnn.create_train_state(NoFlag(), optax.sgd(0.1), x, 0, train_kwarg=None)


def test_unknown_train_kwarg_is_refused_with_the_keywords_the_model_takes():
    with pytest.raises(ValueError, match=r"train_kwarg='train'.*takes \['x', 'training'\]"):
        jnn.create_train_state(KerasStyle(), optax.sgd(0.1), _batch()["inputs"][:1], 0, train_kwarg="train")


# ---- BatchNorm across devices, whatever axis name the model was written with ----


class PlainBN(nn.Module):
    """`nn.BatchNorm()` with no axis name: per-device statistics unless jnn binds the axis."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(C)(nn.relu(x))


class HardCodedAxisBN(nn.Module):
    """Flax's ImageNet ResNet: `axis_name="batch"` written into the model."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name="batch")(x)
        return nn.Dense(C)(nn.relu(x))


def _single(model, steps=3, seed=0):
    state = jnn.create_train_state(model, optax.adam(1e-2), _batch()["inputs"][:1], 0)
    step = jax.jit(jnn.make_train_step(CE))
    for i in range(steps):
        state, _ = step(state, _batch(seed + i, n=64))
    return jax.device_get(state.variables)


def _parallel(model, mode, steps=3, seed=0):
    state = jnn.create_train_state(model, optax.adam(1e-2), _batch()["inputs"][:1], 0)
    if mode == "pmap":
        step = parallel.pmap_train_step(loss_fn=CE)
        state = step.replicate(state)
        for i in range(steps):
            state, _ = step(state, step.shard_batch(_batch(seed + i, n=64)))
        return jax.device_get(parallel.pmap_unreplicate(state).variables)
    mesh = parallel.make_mesh()
    step = parallel.data_parallel(jnn.make_train_step(CE), mesh) if mode == "jit" else \
        parallel.shard_map_train_step(loss_fn=CE, mesh=mesh)
    state = step.shard_state(state)
    for i in range(steps):
        state, _ = step(state, step.shard_batch(_batch(seed + i, n=64)))
    return parallel.to_host(state.variables)


@pytest.mark.parametrize("mode", ["pmap", "shard_map", "jit"])
@pytest.mark.parametrize("model", [PlainBN(), HardCodedAxisBN()], ids=["no_axis_name", "axis_name_batch"])
def test_any_batch_norm_equals_single_device_training_on_every_path(model, mode):
    want = _single(PlainBN())  # the same parameters: the axis name is not a parameter
    chex.assert_trees_all_close(_parallel(model, mode), want, rtol=tol.PARALLEL_RTOL, atol=tol.PARALLEL_ATOL)


def test_hard_coded_axis_name_trains_under_plain_jit():
    chex.assert_trees_all_equal(_single(HardCodedAxisBN()), _single(PlainBN()))


def test_sync_batch_stats_false_keeps_per_device_statistics():
    state = jnn.create_train_state(PlainBN(), optax.adam(1e-2), _batch()["inputs"][:1], 0)
    step = parallel.pmap_train_step(loss_fn=CE, sync_batch_stats=False)
    out, _ = step(step.replicate(state), step.shard_batch(_batch(0, n=64)))
    synced = _parallel(PlainBN(), "pmap", steps=1)
    assert not np.allclose(jax.device_get(parallel.pmap_unreplicate(out).params["Dense_0"]["kernel"]),
                           synced["params"]["Dense_0"]["kernel"], rtol=0, atol=1e-6)
    assert out.model == step.replicate(state).model  # the caller's static model comes back


# ---- explicit meshes, embeddings ----


class Embedder(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(C)(nn.Embed(50, 8)(ids).mean(axis=1))


def _tokens(seed, n=64):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, 50, size=(n, 5)).astype(np.int32),
            "labels": rng.integers(0, C, size=n).astype(np.int32)}


def test_data_parallel_accepts_a_jax_make_mesh_with_explicit_axes():
    mesh = jax.make_mesh((8,), ("data",))  # Explicit axis types by default
    state = jnn.create_train_state(Embedder(), optax.adam(1e-2), _tokens(0)["inputs"][:1], 0)
    single = jax.jit(jnn.make_train_step(CE))
    want = state
    for i in range(3):
        want, _ = single(want, _tokens(i))
    step = parallel.data_parallel(jnn.make_train_step(CE), mesh)
    got = step.shard_state(state)
    for i in range(3):
        got, _ = step(got, parallel.shard_batch(_tokens(i), mesh))
    chex.assert_trees_all_close(parallel.to_host(got.params), jax.device_get(want.params),
                                rtol=tol.PARALLEL_RTOL, atol=tol.PARALLEL_ATOL)


# ---- collections: only batch statistics are averaged; sown values are not state ----


class CountingBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        count = self.variable("cache", "count", lambda: jnp.zeros((), jnp.int32))
        if train:
            count.value += 1
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
        return nn.Dense(C)(x)


def test_pmap_averages_only_batch_statistics_other_collections_keep_dtype():
    state = jnn.create_train_state(CountingBN(), optax.sgd(0.1), _batch()["inputs"][:1], 0)
    step = parallel.pmap_train_step(loss_fn=CE)
    pstate = step.replicate(state)
    for i in range(3):
        pstate, _ = step(pstate, step.shard_batch(_batch(i, n=64)))
    count = pstate.model_state["cache"]["count"]
    assert count.dtype == jnp.int32 and count.shape == (8,)
    np.testing.assert_array_equal(np.asarray(count), np.full(8, 3, np.int32))


class Sower(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(8)(x))
        self.sow("stats", "activation_mean", h.mean())
        self.sow("intermediates", "h", h)
        return nn.Dense(C)(h)


def test_sown_collections_are_not_state_and_the_step_traces_once():
    state = jnn.create_train_state(Sower(), optax.sgd(0.1), _batch()["inputs"][:1], 0)
    assert state.model_state == {}
    state, _ = _train(state, steps=2)
    assert state.model_state == {}
    jnn.testing.check_no_retrace(Sower(), _batch()["inputs"], _batch()["labels"], loss_fn=CE)


# ---- inputs as a tuple or dict; outputs as a dict; losses that read the batch ----


class TextClassifier(nn.Module):
    """Two inputs (token ids and lengths) and dropout, as Flax's SST-2 example."""

    @nn.compact
    def __call__(self, ids, lengths, deterministic: bool = True):
        mask = (jnp.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)  # (B, T)
        emb = nn.Embed(50, 8)(ids) * mask[..., None]
        pooled = emb.sum(1) / jnp.maximum(lengths[:, None], 1).astype(jnp.float32)
        pooled = nn.Dropout(0.3, deterministic=deterministic)(pooled)
        return nn.Dense(C)(pooled)


def _text(seed, n=64):
    rng = np.random.default_rng(seed)
    return {"inputs": (rng.integers(0, 50, size=(n, 7)).astype(np.int32),
                       rng.integers(1, 8, size=n).astype(np.int32)),
            "labels": rng.integers(0, C, size=n).astype(np.int32)}


def test_tuple_inputs_are_positional_arguments_and_train_on_every_path():
    state = jnn.create_train_state(TextClassifier(), optax.adam(1e-2), jax.tree.map(lambda a: a[:1], _text(0)["inputs"]), 0)
    assert state.spec.inputs == (("[0]", (7,), "int32"), ("[1]", (), "int32"))
    single = jax.jit(jnn.make_train_step(CE))
    want = state
    for i in range(3):
        want, metrics = single(want, _text(i))
    mesh = parallel.make_mesh()
    step = parallel.data_parallel(jnn.make_train_step(CE), mesh)
    got = step.shard_state(state)
    for i in range(3):
        got, _ = step(got, step.shard_batch(_text(i)))
    chex.assert_trees_all_close(parallel.to_host(got.params), jax.device_get(want.params),
                                rtol=tol.PARALLEL_RTOL, atol=tol.PARALLEL_ATOL)
    # pmap draws a dropout mask per device: it trains, but is not the single-device run.
    pstep = parallel.pmap_train_step(loss_fn=CE)
    pstate = pstep.replicate(state)
    for i in range(3):
        pstate, pmetrics = pstep(pstate, pstep.shard_batch(_text(i)))
    assert np.all(np.isfinite(np.asarray(pmetrics["loss"])))


def test_tuple_inputs_that_do_not_fit_the_signature_are_refused():
    with pytest.raises(ValueError, match="positional arguments.*Fix: pass a list or a dict"):
        jnn.create_train_state(Embedder(), optax.sgd(0.1), (np.zeros((1, 5), np.int32),) * 2, 0)
    # A second array would land in `train=`: refused, not passed as the mode flag.
    with pytest.raises(ValueError, match="mode keyword 'train'.*Fix: pass a list or a dict"):
        jnn.create_train_state(PlainBN(), optax.sgd(0.1), (np.zeros((1, F), np.float32),) * 2, 0)


class ImageText(nn.Module):
    """One dict argument: image and text."""

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        image = nn.Dense(8)(inputs["image"].reshape(len(inputs["image"]), -1))
        text = nn.Embed(50, 8)(inputs["text"]).mean(axis=1)
        return nn.Dense(C)(nn.Dropout(0.2, deterministic=not train)(image + text))


def _image_text(seed, n=20):
    rng = np.random.default_rng(seed)
    return {"inputs": {"image": rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
                       "text": rng.integers(0, 50, size=(n, 3)).astype(np.int32)},
            "labels": rng.integers(0, C, size=n).astype(np.int32)}


def test_dict_inputs_validate_pad_pipeline_and_fit():
    data = _image_text(0)
    state = jnn.create_train_state(ImageText(), optax.adam(1e-2), jax.tree.map(lambda a: a[:1], data["inputs"]), 0)
    with pytest.raises(ValueError, match=r"batch\['inputs'\]\['text'\] has shape \(20, 4\)"):
        jnn.check_batch(state, {**data, "inputs": {**data["inputs"], "text": np.zeros((20, 4), np.int32)}})
    with pytest.raises(ValueError, match="structure"):
        jnn.check_batch(state, {**data, "inputs": data["inputs"]["image"]})
    padded = jnn.pad_batch(jax.tree.map(lambda a: a[:5], data), 8)
    assert padded["inputs"]["text"].shape == (8, 3) and padded["mask"].tolist() == [1] * 5 + [0] * 3
    train = jnn.data.Pipeline(data, 8, seed=0)
    result = jnn.fit(state, train, num_steps=6, loss_fn="cross_entropy", log_every=3,
                     eval_data=jnn.data.Pipeline(data, 8, train=False), eval_every=6)
    assert np.isfinite(result.history[-1]["loss"]) and int(result.state.step) == 6


class DictOutput(nn.Module):
    @nn.compact
    def __call__(self, x):
        return {"logits": nn.Dense(C)(x), "aux": x.sum(-1)}


def test_a_named_loss_on_a_dict_output_says_how_to_write_the_loss():
    state = jnn.create_train_state(DictOutput(), optax.sgd(0.1), _batch()["inputs"][:1], 0)
    assert state.spec.output_kind == "dict with keys ['aux', 'logits']"
    with pytest.raises(ValueError, match=r"returns a dict with keys \['aux', 'logits'\].*receives the model's whole output"):
        jax.jit(jnn.make_train_step("cross_entropy"))(state, _batch())


def test_a_loss_can_read_other_batch_entries():
    def weighted(outputs, labels, batch):
        return CE(outputs["logits"], labels) * batch["weights"]

    state = jnn.create_train_state(DictOutput(), optax.sgd(0.1), _batch()["inputs"][:1], 0)
    batch = {**_batch(), "weights": np.r_[np.ones(B // 2), np.zeros(B // 2)].astype(np.float32)}
    _, metrics = jax.jit(jnn.make_train_step(weighted))(state, batch)
    outputs = state.apply_fn(state.variables, batch["inputs"])
    want = np.mean(np.asarray(CE(outputs["logits"], batch["labels"])) * batch["weights"])
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=tol.F32_REORDER_RTOL)


# ---- dtypes, optimizers with extra arguments, ensembles ----


def test_bfloat16_inputs_are_accepted_like_float16():
    state = jnn.create_train_state(PlainBN(), optax.sgd(0.1), _batch()["inputs"][:1], 0)
    for dtype in (jnp.float16, jnp.bfloat16):
        batch = {**_batch(), "inputs": jnp.asarray(_batch()["inputs"], dtype)}
        jnn.check_batch(state, batch)
        _, metrics = jax.jit(jnn.make_train_step(CE))(state, batch)
        assert np.isfinite(float(metrics["loss"]))


def test_reduce_on_plateau_receives_the_loss():
    tx = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=1, factor=0.5, accumulation_size=1))
    state = jnn.create_train_state(PlainBN(), tx, _batch()["inputs"][:1], 0)
    step = jax.jit(jnn.make_train_step(CE))
    for _ in range(3):
        state, metrics = step(state, _batch())
    plateau = state.opt_state[1]
    assert np.isfinite(float(plateau.best_value)) and float(plateau.best_value) < 1e9


def test_create_ensemble_takes_numpy_seeds_and_equals_its_members_bitwise():
    x = _batch()["inputs"][:1]
    stacked = jnn.create_ensemble(KerasStyle(), optax.adam(1e-3), x, np.int64(0), 3)
    keys = jnn.vmap.ensemble_keys(np.int64(0), 3)
    for i in range(3):
        member = jnn.create_train_state(KerasStyle(), optax.adam(1e-3), x, keys[i])
        chex.assert_trees_all_equal(jax.device_get(jnn.vmap.ensemble_member(stacked.variables, i)),
                                    jax.device_get(member.variables))
        chex.assert_trees_all_equal(jax.random.key_data(stacked.rng[i]), jax.random.key_data(member.rng))


def test_not_a_flax_module_is_refused():
    with pytest.raises(ValueError, match="expected a flax.linen.Module or a flax.nnx.Module"):
        jnn.create_train_state(lambda x: x, optax.sgd(0.1), _batch()["inputs"][:1], 0)


# ---- Flax's VAE example: noise from make_rng, a tuple output, a loss written for it ----


class VAE(nn.Module):
    latents: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16)(x))
        mean, logvar = nn.Dense(self.latents)(h), nn.Dense(self.latents)(h)
        eps = jax.random.normal(self.make_rng("noise"), logvar.shape)
        z = mean + eps * jnp.exp(0.5 * logvar)
        return nn.Dense(x.shape[-1])(nn.relu(nn.Dense(16)(z))), mean, logvar


def vae_loss(outputs, labels):
    recon, mean, logvar = outputs
    kl = -0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=-1)  # (B,)
    return jnp.sum((recon - labels) ** 2, axis=-1) + kl


def _vae_batch(seed, n=64):
    x = np.random.default_rng(seed).normal(size=(n, F)).astype(np.float32)
    return {"inputs": x, "labels": x}


def test_vae_drawing_noise_trains_under_jit_data_parallel_and_pmap():
    state = jnn.create_train_state(VAE(), optax.adam(1e-2), _vae_batch(0)["inputs"][:1], 0)
    assert state.spec.output_kind == "tuple of 3"
    single = jax.jit(jnn.make_train_step(vae_loss))
    want = state
    for i in range(3):
        want, metrics = single(want, _vae_batch(i))
    step = parallel.data_parallel(jnn.make_train_step(vae_loss), parallel.make_mesh())
    got = step.shard_state(state)
    for i in range(3):
        got, _ = step(got, step.shard_batch(_vae_batch(i)))
    chex.assert_trees_all_close(parallel.to_host(got.params), jax.device_get(want.params),
                                rtol=tol.PARALLEL_RTOL, atol=tol.PARALLEL_ATOL)
    pstep = parallel.pmap_train_step(loss_fn=vae_loss)  # noise per device: trains, not bitwise equal
    pstate = pstep.replicate(state)
    losses = []
    for i in range(20):
        pstate, pmetrics = pstep(pstate, pstep.shard_batch(_vae_batch(0)))
        losses.append(float(np.asarray(pmetrics["loss"])[0]))
    assert losses[-1] < losses[0]
