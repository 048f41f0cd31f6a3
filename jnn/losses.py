"""Pure loss functions `loss(outputs, labels) -> per-example (or per-element) losses`.

Thin over `optax.losses` wherever optax has the loss. None of these reduce over the batch: the
train step averages them, weighted by the batch's optional "mask", so a padded batch or a sequence
mask is handled in one place. `masked_mean` does the same reduction for use outside the step.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jnn._names import unknown

Array = jax.Array


def softmax_cross_entropy(logits: Array, labels: Array, *, label_smoothing: float = 0.0) -> Array:
    """Cross-entropy with one-hot (or probability) labels. Shapes: (..., C), (..., C) -> (...)."""
    if label_smoothing:
        labels = optax.smooth_labels(labels, label_smoothing)
    return optax.softmax_cross_entropy(logits, labels)


def softmax_cross_entropy_with_integer_labels(
    logits: Array, labels: Array, *, label_smoothing: float = 0.0
) -> Array:
    """Cross-entropy with integer class ids. Shapes: (..., C), (...) -> (...).

    With `label_smoothing = a`, the target is `(1 - a) * one_hot + a / C` (as in PyTorch's
    `CrossEntropyLoss(label_smoothing=a)` and `optax.smooth_labels`).
    """
    if label_smoothing:
        one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        return softmax_cross_entropy(logits, one_hot, label_smoothing=label_smoothing)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy(logits: Array, labels: Array, *, label_smoothing: float = 0.0) -> Array:
    """Softmax cross-entropy for integer labels (..., ) or one-hot / soft labels (..., C)."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return softmax_cross_entropy_with_integer_labels(logits, labels, label_smoothing=label_smoothing)
    return softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing)


def fused_cross_entropy(logits: Array, labels: Array) -> Array:
    """`cross_entropy` for integer labels whose backward pass recomputes the softmax.

    Autodiff of the plain loss keeps `exp(logits - max)` in float32 from the forward pass to the
    backward one: for a language model's head that is a (batch, length, vocabulary) array, 3.3 GB
    for GPT-2 small at batch 16 x 1024. This loss keeps only the log-normaliser (one float per
    position) and recomputes the softmax in one fused pass over the logits, which may stay in the
    model's compute dtype (upcast here, inside the reductions). The values equal
    `cross_entropy`'s; gradients agree within float32 rounding (not bitwise).

    Shapes: (..., C) floating, (...) integer -> (...) float32.
    """
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"fused_cross_entropy: expected integer class ids, received labels of dtype {labels.dtype}. "
                        f"Fix: use loss 'cross_entropy' for one-hot or soft labels.")
    labels = labels.astype(jnp.int32)
    # A negative id counts from the end, as `cross_entropy`'s `take_along_axis` reads it: the same
    # class in the forward pass and in the backward pass's one-hot.
    return _fused_ce(logits, jnp.where(labels < 0, labels + logits.shape[-1], labels))


def _fused_ce_parts(logits: Array, labels: Array) -> tuple[Array, Array]:
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    lse = jax.nn.logsumexp(x, axis=-1)  # as optax's integer cross-entropy computes it
    label_logit = jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0]
    return lse - label_logit, lse


@jax.custom_vjp
def _fused_ce(logits: Array, labels: Array) -> Array:
    return _fused_ce_parts(logits, labels)[0]


def _fused_ce_fwd(logits: Array, labels: Array):
    loss, lse = _fused_ce_parts(logits, labels)
    return loss, (logits, labels, lse)


def _fused_ce_bwd(residuals, g: Array):
    logits, labels, lse = residuals
    x = logits.astype(lse.dtype)
    hit = labels[..., None] == jax.lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1)
    grad = (jnp.exp(x - lse[..., None]) - hit) * g[..., None]
    return grad.astype(logits.dtype), np.zeros(labels.shape, jax.dtypes.float0)


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def nll_loss(log_probs: Array, labels: Array) -> Array:
    """Negative log-likelihood of integer labels under log-probabilities (PyTorch's `nll_loss`).

    Pair it with a model that ends in `log_softmax`. Shapes: (..., C), (...) -> (...).
    """
    return -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def binary_cross_entropy_with_logits(logits: Array, labels: Array) -> Array:
    """Elementwise sigmoid binary cross-entropy; labels in [0, 1] of the logits' shape."""
    return optax.sigmoid_binary_cross_entropy(logits, jnp.asarray(labels, logits.dtype))


def mean_squared_error(predictions: Array, targets: Array) -> Array:
    """Elementwise squared error; the step's mean of it is PyTorch's `MSELoss()`."""
    if predictions.shape != jnp.shape(targets):
        raise ValueError(
            f"mean_squared_error: predictions have shape {predictions.shape} but targets have shape "
            f"{jnp.shape(targets)}; expected equal shapes (broadcasting here is almost always a bug). "
            f"Fix: reshape the targets, e.g. targets[:, None]."
        )
    return optax.squared_error(predictions, jnp.asarray(targets, predictions.dtype))


def mask_fits(mask_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """The mask rule, in one place: a mask weighs the leading axes of `shape`; each of its axes is
    that axis's size or 1 (so a (B, 1) mask broadcasts over (B, T) labels or losses)."""
    return len(mask_shape) <= len(shape) and all(m in (1, v) for m, v in zip(mask_shape, shape))


def mask_weights(mask: Array, values: Array) -> Array:
    """`mask` over the leading axes of `values` (e.g. (B,) for (B, T) losses), broadcast to its shape.

    Raises:
      ValueError: the mask's shape is not a prefix of the losses' shape, up to axes of size 1
        (checked on shapes, so under `jit` it is raised while tracing).
    """
    mask = jnp.asarray(mask, values.dtype)
    if not mask_fits(mask.shape, values.shape):
        raise ValueError(
            f"the batch's 'mask' has shape {mask.shape}, but the loss function returned losses of shape "
            f"{values.shape}; a mask weighs the leading axes of the losses, so its shape must be a prefix "
            f"of theirs, e.g. {values.shape[:1]}. Fix: return one loss per masked element (no mean over "
            f"those axes) from the loss function, or pass a mask of shape {values.shape[:1]}.")
    return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim)), values.shape)


def masked_mean(losses: Array, mask: Array | None = None) -> Array:
    """Mean of `losses` weighted by `mask`, which may cover only the leading axes (e.g. (B,))."""
    losses = jnp.asarray(losses)
    if mask is None:
        return losses.mean()
    total, weight = masked_sum(losses, mask)
    return total / jnp.maximum(weight, 1e-12)


def masked_sum(losses: Array, mask: Array) -> tuple[Array, Array]:
    """`(sum of losses weighted by mask, total weight)`; masked-out elements are selected out, so a
    NaN there does not count (0 * NaN would be NaN). Shared by `masked_mean` and the steps."""
    weights = mask_weights(mask, losses)
    return jnp.where(weights > 0, losses * weights, 0).sum(), weights.sum()


def elbo_loss(outputs: Any, labels: Array) -> Array:
    """Negative ELBO of a `jnn.models.VAE` (re-exported here; defined beside the model)."""
    from jnn.models import elbo_loss as _elbo  # the model family owns its loss

    return _elbo(outputs, labels)


_LOSSES: dict[str, Callable[..., Array]] = {
    "cross_entropy": cross_entropy,
    "fused_cross_entropy": fused_cross_entropy,
    "softmax_cross_entropy": softmax_cross_entropy,
    "softmax_cross_entropy_with_integer_labels": softmax_cross_entropy_with_integer_labels,
    "nll": nll_loss,
    "nll_loss": nll_loss,
    "binary_cross_entropy_with_logits": binary_cross_entropy_with_logits,
    "bce": binary_cross_entropy_with_logits,
    "mean_squared_error": mean_squared_error,
    "mse": mean_squared_error,
    "elbo": elbo_loss,
}


# Losses that take a model's whole structured output (a tuple or dict), not one output array.
STRUCTURED_OUTPUT_LOSSES: tuple[Callable[..., Array], ...] = (elbo_loss,)


def names() -> list[str]:
    """The names `get` accepts."""
    return sorted(_LOSSES)


def get(name: str, **kwargs: Any) -> Callable[[Any, Array], Array]:
    """The loss function called `name`, with keyword arguments bound (e.g. `label_smoothing`).

    Raises:
      ValueError: for an unknown name, listing the valid ones.
    """
    if name not in _LOSSES:
        raise unknown("loss", name, names())
    fn = _LOSSES[name]
    accepted = inspect.signature(fn).parameters
    extra = sorted(k for k in kwargs if k not in accepted or accepted[k].kind != inspect.Parameter.KEYWORD_ONLY)
    if extra:
        options = [k for k, p in accepted.items() if p.kind == inspect.Parameter.KEYWORD_ONLY]
        raise ValueError(f"loss {name!r} takes no option(s) {extra}; it takes {options or 'none'}. "
                         f"Fix: drop them (label_smoothing applies to the cross-entropy losses).")
    return functools.partial(fn, **kwargs) if kwargs else fn
