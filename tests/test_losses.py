"""Loss values against independent formulas, and gradients checked in float64 (orders 1 and 2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jnn import losses
from tests import tolerances as tol

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

C = 5


def _logits(seed=0, shape=(4, C)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _int_labels(seed=1, n=4):
    return jnp.asarray(np.random.default_rng(seed).integers(0, C, n), jnp.int32)


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# Each case: (name, loss of one differentiable argument, its input) for check_grads.
def _grad_cases():
    y = _int_labels()
    one_hot = jax.nn.one_hot(y, C, dtype=jnp.float64)
    targets = _logits(3)
    bits = jnp.asarray(np.random.default_rng(4).integers(0, 2, (4, C)), jnp.float64)
    return [
        ("ce_int", lambda z: losses.softmax_cross_entropy_with_integer_labels(z, y).sum(), _logits()),
        ("ce_int_smooth", lambda z: losses.softmax_cross_entropy_with_integer_labels(
            z, y, label_smoothing=0.1).sum(), _logits()),
        ("ce_one_hot_smooth", lambda z: losses.softmax_cross_entropy(z, one_hot, label_smoothing=0.2).sum(), _logits()),
        ("nll", lambda z: losses.nll_loss(jax.nn.log_softmax(z), y).sum(), _logits()),
        ("bce", lambda z: losses.binary_cross_entropy_with_logits(z, bits).sum(), _logits()),
        ("mse", lambda z: losses.mean_squared_error(z, targets).sum(), _logits()),
        ("masked_mean", lambda z: losses.masked_mean(losses.cross_entropy(z, y), jnp.array([1.0, 0.0, 1.0, 1.0])),
         _logits()),
    ]


@pytest.mark.parametrize("case", range(7))
def test_gradients_float64_orders_1_and_2_forward_and_reverse(case):
    with jax.enable_x64(True):
        name, fn, x = _grad_cases()[case]
        assert x.dtype == jnp.float64, name
        check_grads(jax.jit(fn), (x,), order=2, modes=("fwd", "rev"), atol=tol.GRAD_CHECK_ATOL,
                    rtol=tol.GRAD_CHECK_RTOL, eps=tol.FINITE_DIFF_EPS)


def test_integer_cross_entropy_with_label_smoothing_matches_formula():
    z, y, a = _logits(), _int_labels(), 0.1
    target = np.full((4, C), a / C)
    target[np.arange(4), np.asarray(y)] += 1 - a  # PyTorch CrossEntropyLoss(label_smoothing=a)
    expected = -(target * _np_log_softmax(z)).sum(-1)
    np.testing.assert_allclose(losses.softmax_cross_entropy_with_integer_labels(z, y, label_smoothing=a),
                               expected, atol=tol.F32_REFERENCE_ATOL)
    np.testing.assert_allclose(losses.cross_entropy(z, y), -_np_log_softmax(z)[np.arange(4), np.asarray(y)],
                               atol=tol.F32_REFERENCE_ATOL)


def test_one_hot_and_integer_forms_agree():
    z, y = _logits(), _int_labels()
    np.testing.assert_allclose(losses.cross_entropy(z, jax.nn.one_hot(y, C), label_smoothing=0.3),
                               losses.cross_entropy(z, y, label_smoothing=0.3), atol=tol.F32_REFERENCE_ATOL)


def test_log_softmax_plus_nll_is_cross_entropy():
    z, y = _logits(), _int_labels()
    np.testing.assert_allclose(losses.nll_loss(jax.nn.log_softmax(z), y), losses.cross_entropy(z, y),
                               atol=tol.F32_REFERENCE_ATOL)


def test_bce_and_mse_match_formulas():
    z = np.asarray(_logits(), np.float64)
    t = np.random.default_rng(5).uniform(size=z.shape)
    p = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(losses.binary_cross_entropy_with_logits(jnp.asarray(z, jnp.float32), t),
                               -(t * np.log(p) + (1 - t) * np.log(1 - p)), atol=tol.F32_REFERENCE_ATOL)
    np.testing.assert_allclose(losses.mean_squared_error(jnp.asarray(z, jnp.float32), t), (z - t) ** 2,
                               atol=tol.F32_REFERENCE_ATOL)


def test_mse_refuses_silent_broadcasting():
    with pytest.raises(ValueError, match=r"predictions have shape \(4, 1\) but targets have shape \(4,\)"):
        losses.mean_squared_error(jnp.zeros((4, 1)), jnp.zeros(4))


def test_masked_mean_weighs_leading_axes():
    values = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_allclose(losses.masked_mean(values, jnp.array([1.0, 0.0, 1.0])),
                               np.concatenate([np.arange(4.0), np.arange(8.0, 12.0)]).mean())


def test_registry_names_and_unknown():
    assert losses.get("nll") is losses.nll_loss
    fn = losses.get("cross_entropy", label_smoothing=0.1)
    np.testing.assert_allclose(fn(_logits(), _int_labels()),
                               losses.cross_entropy(_logits(), _int_labels(), label_smoothing=0.1))
    with pytest.raises(ValueError, match=r"unknown loss 'cross_entropi'; expected one of .*Did you mean 'cross_entropy'"):
        losses.get("cross_entropi")


# ----------------------------------------------------------------------------------------------
# Every loss name trains a zoo model it fits, through make_train_step(name).
# ----------------------------------------------------------------------------------------------


def _zoo_case(name: str):
    """(model, batch) for loss `name`: the digits with a zoo MLP (class ids, one-hot, multi-hot or
    regression targets), its log-softmax for NLL, and the zoo VAE for the ELBO."""
    import flax.linen as nn

    from jnn import data, models

    class LogSoftmax(nn.Module):  # a classifier whose outputs are log-probabilities, as NLL expects
        inner: nn.Module

        def __call__(self, x, train: bool = False):
            return nn.log_softmax(self.inner(x, train=train))

    digits = data.load("digits").train
    images, y = digits["inputs"][:64], digits["labels"][:64]  # (64, 8, 8, 1) in [0, 1]
    x = images.reshape(64, -1)
    mlp = lambda n: models.get("mlp_mnist", hidden_sizes=(32,), num_classes=n, in_features=None)  # noqa: E731
    if name in ("cross_entropy", "fused_cross_entropy", "softmax_cross_entropy_with_integer_labels"):
        return mlp(10), {"inputs": x, "labels": y}
    if name == "softmax_cross_entropy":
        return mlp(10), {"inputs": x, "labels": np.eye(10, dtype=np.float32)[y]}
    if name in ("nll", "nll_loss"):
        return LogSoftmax(mlp(10)), {"inputs": x, "labels": y}
    if name in ("bce", "binary_cross_entropy_with_logits"):  # multi-label: digit >= 5, digit is even
        return mlp(2), {"inputs": x, "labels": np.stack([y >= 5, y % 2 == 0], -1).astype(np.float32)}
    if name in ("mse", "mean_squared_error"):  # regress the digit's value
        return mlp(1), {"inputs": x, "labels": (y[:, None] / 9.0).astype(np.float32)}
    assert name == "elbo", f"no zoo case for the loss {name!r}: add one"
    return (models.get("vae_mnist", image_shape=(8, 8, 1), hidden_sizes=(32,), latent_dim=4),
            {"inputs": images, "labels": images})


@pytest.mark.parametrize("name", losses.names())
def test_every_loss_name_trains_a_zoo_model(name):
    import optax

    import jnn

    model, batch = _zoo_case(name)
    state = jnn.create_train_state(model, optax.adam(1e-2), batch["inputs"][:1], 0)
    step = jax.jit(jnn.make_train_step(name))
    first = None
    for _ in range(30):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) < 0.9 * first, (name, first, metrics)


def test_fused_cross_entropy_equals_cross_entropy_and_its_gradients():
    z, y = _logits(shape=(3, 7, C)).astype(jnp.float32), jnp.asarray(np.random.default_rng(2).integers(0, C, (3, 7)))
    np.testing.assert_allclose(losses.fused_cross_entropy(z, y), losses.cross_entropy(z, y), rtol=1e-6)
    g = jax.grad(lambda a: losses.fused_cross_entropy(a, y).mean())(z)
    ref = jax.grad(lambda a: losses.cross_entropy(a, y).mean())(z)
    np.testing.assert_allclose(g, ref, atol=1e-7)
    # bfloat16 logits (a language model's head): float32 losses, bfloat16 gradients, same values.
    zb = z.astype(jnp.bfloat16)
    assert losses.fused_cross_entropy(zb, y).dtype == jnp.float32
    np.testing.assert_allclose(losses.fused_cross_entropy(zb, y), losses.cross_entropy(zb.astype(jnp.float32), y),
                               rtol=1e-6)
    gb = jax.grad(lambda a: losses.fused_cross_entropy(a, y).mean())(zb)
    assert gb.dtype == jnp.bfloat16
    np.testing.assert_allclose(gb.astype(jnp.float32), ref, atol=2e-3)
    with jax.enable_x64(True):  # reverse mode, orders 1 and 2 (a custom VJP has no forward mode)
        check_grads(jax.jit(lambda a: losses.fused_cross_entropy(a, _int_labels()).sum()), (_logits(),), order=2,
                    modes=("rev",), atol=tol.GRAD_CHECK_ATOL, rtol=tol.GRAD_CHECK_RTOL, eps=tol.FINITE_DIFF_EPS)
    # A negative id is the class counted from the end, in the value and in the gradient alike.
    neg = jnp.asarray([-1, 0, -C])
    np.testing.assert_allclose(losses.fused_cross_entropy(z[0, :3], neg), losses.cross_entropy(z[0, :3], neg), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda a: losses.fused_cross_entropy(a, neg).sum())(z[0, :3]),
                               jax.grad(lambda a: losses.cross_entropy(a, neg).sum())(z[0, :3]), atol=1e-7)
    with pytest.raises(TypeError, match="integer class ids.*Fix: use loss 'cross_entropy'"):
        losses.fused_cross_entropy(z, jax.nn.one_hot(y, C))
    assert losses.get("fused_cross_entropy") is losses.fused_cross_entropy


def test_fused_cross_entropy_keeps_no_softmax_for_the_backward_pass():
    """What it is for: the plain loss's backward pass keeps a float32 softmax of the logits' size;
    the fused one keeps the log-normaliser (one float per row)."""
    y = jnp.zeros((512,), jnp.int32)
    for dtype in (jnp.float32, jnp.bfloat16):  # bfloat16: a float32 upcast kept would show
        z = jnp.zeros((512, 2048), dtype)

        def residual_bytes(loss):
            _, vjp = jax.vjp(lambda a: loss(a, y).mean(), z)  # noqa: B023
            return sum(x.nbytes for x in jax.tree.leaves(vjp) if hasattr(x, "nbytes") and x is not z)  # noqa: B023

        assert residual_bytes(losses.cross_entropy) >= z.nbytes  # a (512, 2048) array
        assert residual_bytes(losses.fused_cross_entropy) <= 512 * 4 * 2  # the normaliser and the labels
