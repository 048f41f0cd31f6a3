"""Mixed precision: the policy runs any model in its compute dtype around float32 master
parameters, bfloat16 training follows float32's loss curve, and float16's dynamic loss scale skips
exactly the overflowing update, halves, and grows back."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax.linen as nn
from flax import nnx

import jnn
from jnn import precision
from tests._tiny import TinyBNDropout, TinyNnxLinear

SPLITS = jnn.data.load("digits", val_fraction=0.1, seed=0)


def _cnn_state(policy, tx=None):
    return jnn.create_train_state(jnn.models.get("digits_cnn", num_classes=10), tx or optax.adam(1e-3),
                                  SPLITS.train["inputs"][:1], 0, precision=policy)


def _batch(n=64, start=0):
    return {k: v[start:start + n] for k, v in SPLITS.train.items()}


def test_bf16_follows_the_float32_loss_curve_and_keeps_float32_parameters():
    """300 steps on the digits: every logged mean loss within 0.01 of float32's (measured: 0.0024 with
    the products in bfloat16; 0.0013 when the policy left them in float32)."""
    curves, finals = {}, {}
    for policy in ("float32", "mixed_bf16"):
        result = jnn.fit(_cnn_state(policy), jnn.data.Pipeline(SPLITS.train, 64, seed=0), num_steps=300,
                         loss_fn="cross_entropy", log_every=50, progress=False)
        curves[policy] = np.array([r["loss"] for r in result.history if r["split"] == "train"])
        finals[policy] = result.state
        assert {a.dtype for a in jax.tree.leaves(result.state.params)} == {jnp.dtype("float32")}
    gap = float(np.max(np.abs(curves["mixed_bf16"] - curves["float32"])))
    print(f"bf16 vs float32 loss curve: max gap {gap:.4f} over {len(curves['float32'])} points, "
          f"final {curves['mixed_bf16'][-1]:.4f} vs {curves['float32'][-1]:.4f}")
    assert gap < 0.01 and curves["mixed_bf16"][-1] < 0.1
    step = jnn.make_train_step("cross_entropy")
    jaxpr = str(jax.make_jaxpr(step)(finals["mixed_bf16"], _batch()))
    assert "bf16" in jaxpr and "bf16" not in str(jax.make_jaxpr(step)(finals["float32"], _batch()))


@pytest.mark.parametrize("metrics", [("loss", "accuracy", "grad_norm"), ("loss",)])  # the norm's check, the sums'
def test_float16_overflow_skips_exactly_that_update_then_the_scale_recovers(metrics):
    policy = precision.Policy("float32", "float16", "float32", loss_scale="dynamic", period=3)
    state = _cnn_state(policy)
    step = jax.jit(jnn.make_train_step("cross_entropy", on_nonfinite="skip", metrics=metrics))
    # A loss scale of 2**40 overflows float16's backward pass (max 65504): the gradients are inf.
    state = state.replace(loss_scale=state.loss_scale._replace(scale=jnp.float32(2.0 ** 40)))
    after, metrics = step(state, _batch())
    chex.assert_trees_all_equal((after.params, after.opt_state, after.model_state),
                                (state.params, state.opt_state, state.model_state))
    assert int(after.step) == 1 and float(after.loss_scale.scale) == 2.0 ** 39
    assert float(metrics["nonfinite"]) == 0.0  # the loss was finite: an overflow, not bad data
    scales, moved = [], False
    for i in range(40):
        before = after
        after, metrics = step(after, _batch(start=64 * (i % 10)))
        scales.append(float(after.loss_scale.scale))
        moved = moved or not all(np.array_equal(a, b) for a, b in
                                 zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)))
        if moved and int(after.loss_scale.good_steps) == 0 and scales[-1] > scales[-2]:
            break  # grown after `period` good steps
    print(f"loss scale after the overflow: {scales}")
    assert moved and scales[-1] == 2 * scales[-2]  # it trains again, and grows after 3 good steps
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(after.params))


def test_loss_scale_is_checkpointed(tmp_path):
    state = _cnn_state("mixed_f16")
    state = jax.jit(jnn.make_train_step("cross_entropy"))(state, _batch())[0]
    with jnn.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(state)
        restored, _ = ckpt.restore(_cnn_state("mixed_f16"))
    chex.assert_trees_all_equal(restored.loss_scale, state.loss_scale)
    assert int(restored.loss_scale.good_steps) == 1


def test_any_model_nnx_and_batch_norm_runs_under_a_policy():
    x = SPLITS.train["inputs"][:32].reshape(32, -1)
    for model in (TinyNnxLinear(), TinyBNDropout(classes=10, width=16, rate=0.1)):
        state = jnn.create_train_state(model, optax.sgd(0.1), x[:1], 0, precision="mixed_bf16")
        outputs, _ = state.model.apply(state.params, state.model_state, x, train=False)
        assert outputs.dtype == jnp.float32  # the output dtype
        new, metrics = jax.jit(jnn.make_train_step("cross_entropy"))(state, {"inputs": x, "labels": _batch(32)["labels"]})
        assert np.isfinite(float(metrics["loss"])) and jax.tree.leaves(new.params)[0].dtype == jnp.float32
        # batch statistics stay in their own dtype
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new.model_state))


def test_abstract_state_matches_the_real_one_under_a_policy():
    tx = optax.adam(1e-3)
    real = _cnn_state("mixed_f16", tx)
    shapes = jnn.abstract_train_state(jnn.models.get("digits_cnn", num_classes=10), tx,
                                      SPLITS.train["inputs"][:1], 0, precision="mixed_f16")
    assert jax.tree.structure(shapes) == jax.tree.structure(real)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(shapes)] == [(a.shape, a.dtype) for a in jax.tree.leaves(real)]


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match=r"unknown precision policy 'mixed_bf15'; expected one of .*Did you mean 'mixed_bf16'"):
        precision.get("mixed_bf15")
    with pytest.raises(ValueError, match=r"compute='float16' with loss_scale='none'.*Fix: .*'mixed_f16'"):
        precision.Policy(compute="float16")
    with pytest.raises(ValueError, match=r"compute='int8'; expected compute one of"):
        precision.Policy(compute="int8")
    with pytest.raises(ValueError, match=r"precision='fp8'; expected precision one of \['float32', 'mixed_bf16'"):
        jnn.TrainConfig(precision="fp8")


def _products(state, x) -> dict:
    jaxpr = jax.make_jaxpr(lambda p: state.model.apply(p, state.model_state, x, train=False,
                                                       rng=jax.random.key(0)))(state.params)
    return precision.product_flops_by_dtype(jaxpr)[0]


@pytest.mark.slow
@pytest.mark.parametrize("policy, dtype", [("mixed_bf16", "bfloat16"), ("mixed_f16", "float16")])
def test_zoo_models_that_pin_float32_compute_in_the_policy_dtype(policy, dtype):
    """jnn's zoo models declare dtype=float32, which made flax promote the cast parameters back to
    float32: every product ran in float32 under "mixed_bf16". The policy now sets the model's dtype."""
    tokens = np.zeros((2, 16), np.int32)
    cases = [(jnn.models.get("digits_cnn", num_classes=10), SPLITS.train["inputs"][:2]),
             (jnn.models.GPT(vocab_size=64, block_size=16, num_layers=1, num_heads=2, embed_dim=32), tokens),
             (jnn.models.ResNet(block="bottleneck", stage_sizes=(1,), widths=(8,), num_classes=10),
              np.zeros((2, 16, 16, 3), np.float32))]
    for model, x in cases:
        assert jnp.dtype(model.dtype) == jnp.float32
        state = jnn.create_train_state(model, optax.sgd(0.1), x[:1], 0, precision=policy)
        flops = _products(state, x)
        if policy == "mixed_f16" and isinstance(model, jnn.models.GPT):  # a CPU's float16 attention runs in float32
            assert flops[dtype] > 0.85 * sum(flops.values()), flops
        else:
            assert set(flops) == {dtype}, (type(model).__name__, flops)
        assert jnp.dtype(state.model.compute_module.dtype) == jnp.dtype(dtype)  # a clone runs in the step
        assert state.model.module is model and model.dtype == jnp.float32  # apply_fn: the user's module
        assert {a.dtype for a in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
        apply = jax.jit(lambda p, ms, x: state.model.apply(p, ms, x, train=False, rng=jax.random.key(0)))
        outputs, _ = apply(state.params, state.model_state, x)  # compiled: op by op it took 1.6-3.2 s per model
        assert outputs.dtype == jnp.float32
        if isinstance(model, jnn.models.GPT):  # it runs: float16 attention on a CPU once failed to compile
            labels = np.zeros(x.shape, np.int32)  # (XLA:CPU has no F16 x F16 -> F32 product)
            _, metrics = jax.jit(jnn.make_train_step("cross_entropy"))(state, {"inputs": x, "labels": labels})
            assert np.isfinite(float(metrics["loss"]))
    # float32 (the identity policy) leaves the model as written
    state = jnn.create_train_state(cases[0][0], optax.sgd(0.1), cases[0][1][:1], 0, precision="float32")
    assert set(_products(state, cases[0][1])) == {"float32"}


class _PinnedLayers(nn.Module):
    """A user's model whose layers pin float32 and that has no `dtype` attribute to set."""

    head_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(256, dtype=jnp.float32, name="body")(x))
        return nn.Dense(10, dtype=self.head_dtype, name="head")(x)


class _Float32Head(nn.Module):
    """Half precision in the body, a float32 head on purpose (an island the policy keeps)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(256, name="body")(x))
        return nn.Dense(10, dtype=jnp.float32, name="head")(x)


def test_a_policy_the_model_would_not_follow_is_refused_with_the_modules_to_fix():
    x = SPLITS.train["inputs"][:4].reshape(4, -1)
    with pytest.raises(ValueError, match=r"compute='bfloat16': _PinnedLayers still runs 100% of its matrix-product "
                                         r"and convolution FLOPs in float32.*Largest \(by module path\): "
                                         r"_PinnedLayers/body \(86%\), _PinnedLayers/head \(14%\).*"
                                         r"Fix: build those layers with dtype=None"):
        jnn.create_train_state(_PinnedLayers(), optax.sgd(0.1), x[:1], 0, precision="mixed_bf16")
    with pytest.raises(ValueError, match=r"compute='float16'"):
        jnn.abstract_train_state(_PinnedLayers(), optax.sgd(0.1), x[:1], 0, precision="mixed_f16")

    class PinnedNnx(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(64, 10, dtype=jnp.float32, rngs=rngs)

        def __call__(self, x):
            return self.linear(x)

    with pytest.raises(ValueError, match=r"PinnedNnx still runs 100%"):
        jnn.create_train_state(PinnedNnx(nnx.Rngs(0)), optax.sgd(0.1), x[:1], 0, precision="mixed_bf16")
    # A float32 island (the head: 14% of the products) is the user's choice: kept, and accepted.
    state = jnn.create_train_state(_Float32Head(), optax.sgd(0.1), x[:1], 0, precision="mixed_bf16")
    flops = _products(state, x)
    assert set(flops) == {"bfloat16", "float32"} and flops["float32"] < 0.2 * flops["bfloat16"]


class _WithDtype(nn.Module):
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10, dtype=self.dtype)(x)


def test_apply_fn_stays_the_users_module_and_dtype_none_is_left_alone():
    x = SPLITS.train["inputs"][:4].reshape(4, -1)
    state = jnn.create_train_state(_WithDtype(), optax.sgd(0.1), x[:1], 0, precision="mixed_bf16")
    assert state.model.compute_module.dtype == jnp.bfloat16
    # state.apply_fn is flax's own apply of the user's module: float32 in, float32 out, as before.
    assert state.apply_fn({"params": state.params}, x).dtype == jnp.float32
    assert state.model.apply(state.params, {}, x, train=False)[0].dtype == jnp.float32  # the policy's output
    # dtype=None already follows the (bfloat16) parameters: nothing to clone.
    none = jnn.create_train_state(_WithDtype(dtype=None), optax.sgd(0.1), x[:1], 0, precision="mixed_bf16")
    assert none.model.compute_module is None and set(_products(none, x)) == {"bfloat16"}


class _ScannedBody(nn.Module):
    """24 scanned half-precision layers and a wide float32 head: 39% of the FLOPs in float32."""

    body_dtype: object = None

    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            dtype: object = None

            @nn.compact
            def __call__(self, h, _):
                return nn.relu(nn.Dense(64, dtype=self.dtype)(h)), None

        h = nn.Dense(64, dtype=self.body_dtype)(x)
        h, _ = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=24)(dtype=self.body_dtype, name="layers")(h, None)
        return nn.Dense(1000, dtype=jnp.float32, name="head")(h)


def test_flops_count_a_scan_body_times_its_length_and_name_its_path():
    """Counted once, the scan body would make the float32 head 94% of the products and the model refused."""
    x = SPLITS.train["inputs"][:4].reshape(4, -1)
    state = jnn.create_train_state(_ScannedBody(), optax.sgd(0.1), x[:1], 0, precision="mixed_bf16")
    flops = _products(state, x)
    per_example = {"bfloat16": 2 * 64 * 64 * 25, "float32": 2 * 64 * 1000}
    assert flops == {k: 4 * v for k, v in per_example.items()}
    # A scan body that pins float32 is refused, named by its full path.
    with pytest.raises(ValueError, match=r"Largest \(by module path\): _ScannedBody/layers/Dense_0 \(\d+%\)"):
        jnn.create_train_state(_ScannedBody(body_dtype=jnp.float32), optax.sgd(0.1), x[:1], 0,
                               precision="mixed_bf16")


def test_jnns_own_float32_attention_does_not_count_against_the_policy():
    """On a CPU, float16 attention runs in float32 (XLA:CPU has no F16 x F16 -> F32 product); a long
    context makes that 95% of the GPT's products, which must not refuse the user's policy."""
    model = jnn.models.GPT(vocab_size=64, block_size=2048, num_layers=1, num_heads=2, embed_dim=16)
    x = np.zeros((1, 2048), np.int32)
    state = jnn.abstract_train_state(model, optax.sgd(0.1), x, 0, precision="mixed_f16")
    flops = _products(state, x)
    assert flops["float32"] > 0.9 * sum(flops.values())  # the island
