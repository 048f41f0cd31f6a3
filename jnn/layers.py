"""Pooling and convolution layers that XLA:CPU runs fast, with the same results as flax's.

On CPU, XLA lowers the gradient of ``flax.linen.max_pool`` (a ``reduce_window``) to a
select-and-scatter that costs several times the rest of a small CNN's backward pass, and the
kernel gradient of a convolution to a convolution whose shape XLA:CPU runs slowly. The layers
here compute the same values another way on CPU:

* ``max_pool`` takes the maximum over the window's strided slices of the (padded) input. Its
  custom JVP gives each output the tangent of the first maximal element of its window (first in
  row-major window order); transposed, that sends the gradient to the element XLA's
  select-and-scatter picks, so gradients equal flax's even with ties, through slices and selects.
* ``avg_pool`` sums the strided slices: its backward is a sum of padded copies.
* ``conv_general_dilated`` (and ``Conv``, a ``flax.linen.Conv`` that uses it) depends on how
  the program is compiled. Under ``jnn.jit`` (``jnn/compiler.py``: XLA's Eigen convolution, not
  YNNPACK's) it is XLA's convolution of an input computed once into its own buffer, so that the
  kernel gradient's transpose reads it instead of recomputing the ops that produced it. Under a
  plain ``jax.jit`` (YNNPACK's slow kernel gradient), for kernels with few input channels, its
  custom JVP writes the kernel's tangent as matrix products over the kernel taps, whose
  transpose (the kernel gradient) XLA:CPU runs faster than its own.

Custom JVPs rather than VJPs keep forward mode (``jax.jvp``, ``jax.jacfwd``) working.

Which implementation runs is decided at trace time: ``"auto"`` (the default) takes these
formulations when ``jax.default_backend()`` is ``"cpu"`` and XLA's native ops elsewhere (GPU and
TPU have fast native kernels); ``"fast"`` and ``"native"`` force one, per call (``impl=``) or for
the process (``set_impl`` / ``using``). The measurements behind this are in
``benchmarks/studies/README.md`` (``benchmarks/studies/cnn_layers.py``).

Example:
  >>> import jax.numpy as jnp
  >>> from jnn import layers
  >>> y = layers.max_pool(jnp.ones((8, 28, 28, 32)), (2, 2), strides=(2, 2))  # (8, 14, 14, 32)
  >>> conv = layers.Conv(64, (3, 3))  # same parameters as flax.linen.Conv(64, (3, 3))
  >>> with layers.using("native"):  # trace with XLA's native ops
  ...     y = layers.avg_pool(jnp.ones((8, 28, 28, 32)), (2, 2), strides=(2, 2))
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jnn import compiler

IMPLS: tuple[str, ...] = ("auto", "fast", "native")
_impl = "auto"
# The per-tap kernel gradient pays for convolutions with few input channels (XLA's own is then
# slowest); up to the first bound the taps are stacked into one matrix product. Measured in
# benchmarks/studies/README.md.
_TAPS_MAX_CHANNELS = 16
_STACKED_TAPS_MAX_CHANNELS = 4
# jax's convolution as imported; qwix's quantization replaces it (the function or its code) while
# it traces a model, and then the convolution must stay that call.
_LAX_CONV = lax.conv_general_dilated
_LAX_CONV_CODE = lax.conv_general_dilated.__code__

Padding = str | Sequence[tuple[int, int]]


def set_impl(impl: str) -> str:
    """Sets the process-wide implementation (``"auto"``, ``"fast"`` or ``"native"``).

    It applies to functions traced afterwards (an already compiled step keeps its own).

    Returns:
      The previous setting.
    """
    global _impl
    previous, _impl = _impl, _check_impl(impl)
    return previous


@contextlib.contextmanager
def using(impl: str) -> Iterator[None]:
    """Context manager: trace with implementation ``impl`` inside the block (not thread-safe)."""
    previous = set_impl(impl)
    try:
        yield
    finally:
        set_impl(previous)


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"jnn.layers implementation must be one of {IMPLS}, received {impl!r}.")
    return impl


def use_fast(impl: str | None = None) -> bool:
    """Whether a layer traced now takes the fast formulation (``impl`` overrides the setting)."""
    impl = _check_impl(_impl if impl is None else impl)
    return jax.default_backend() == "cpu" if impl == "auto" else impl == "fast"


# ------------------------------------------------------------------------------------ pooling


def _window_slices(x: jax.Array, window: tuple[int, ...], strides: tuple[int, ...],
                   out_shape: tuple[int, ...]) -> list[jax.Array]:
    """The strided slice of (padded) ``x`` for every window offset, in row-major window order.

    ``x`` is (*batch, *spatial, C) with ``len(window)`` spatial dims; slice ``i`` holds element
    ``i`` of every window: (*batch, *out_shape, C).
    """
    nb = x.ndim - len(window) - 1
    out = []
    for offset in np.ndindex(*window):
        start = (0,) * nb + offset + (0,)
        limit = (*x.shape[:nb], *(o + s * (n - 1) + 1 for o, s, n in zip(offset, strides, out_shape)),
                 x.shape[-1])
        out.append(lax.slice(x, start, limit, (1,) * nb + strides + (1,)))
    return out


def _pool_geometry(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None,
                   padding: Padding) -> tuple[tuple[int, ...], tuple[int, ...], list[tuple[int, int]],
                                              tuple[int, ...]]:
    """(window, strides, explicit pads, output spatial shape), resolved as flax's ``pool`` does."""
    window = tuple(int(w) for w in window_shape)
    strides = tuple(int(s) for s in strides) if strides else (1,) * len(window)
    if len(strides) != len(window):
        raise ValueError(f"pooling expected one stride per window dimension ({len(window)}), "
                         f"received strides={strides}.")
    spatial = x.shape[x.ndim - len(window) - 1:-1]
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(spatial, window, strides, padding)
    else:
        pads = [tuple(p) for p in padding]
        if len(pads) != len(window) or any(len(p) != 2 for p in pads):
            raise ValueError(f"padding must be 'SAME', 'VALID' or one (low, high) pair per window "
                             f"dimension ({len(window)}), received {padding!r}.")
    out = tuple((n + lo + hi - w) // s + 1 for n, (lo, hi), w, s in zip(spatial, pads, window, strides))
    return window, strides, pads, out


def _pad_spatial(x: jax.Array, pads: Sequence[tuple[int, int]], value: Any) -> jax.Array:
    nb = x.ndim - len(pads) - 1
    config = [(0, 0, 0)] * nb + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
    return lax.pad(x, jnp.asarray(value, x.dtype), config)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_of_slices(x: jax.Array, window: tuple[int, ...], strides: tuple[int, ...],
                   out_shape: tuple[int, ...]) -> jax.Array:
    return functools.reduce(jnp.maximum, _window_slices(x, window, strides, out_shape))


@_max_of_slices.defjvp
def _max_of_slices_jvp(window, strides, out_shape, primals, tangents):
    # Each output's tangent is that of the first element of its window equal to the maximum
    # (row-major window order): transposed, this sends the gradient where XLA's select-and-scatter
    # (select = greater-or-equal) sends it, through slices and selects only.
    (x,), (t,) = primals, tangents
    y = _max_of_slices(x, window, strides, out_shape)
    taken = jnp.zeros(y.shape, bool)
    ty = jnp.zeros(y.shape, t.dtype)
    for xs, ts in zip(_window_slices(x, window, strides, out_shape), _window_slices(t, window, strides, out_shape)):
        hit = (xs == y) & ~taken
        taken = taken | hit
        ty = jnp.where(hit, ts, ty)
    return y, ty


def max_pool(inputs: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: Padding = "VALID", *, impl: str | None = None) -> jax.Array:
    """``flax.linen.max_pool``, with a fast gradient on CPU.

    Args:
      inputs: ``(*batch, *spatial, C)``, e.g. (B, H, W, C); ``len(window_shape)`` spatial dims.
      window_shape: window size per spatial dim.
      strides: stride per spatial dim (default 1).
      padding: ``"VALID"``, ``"SAME"`` or one ``(low, high)`` pair per spatial dim; padded
        elements are ``-inf``.
      impl: ``"auto"``, ``"fast"`` or ``"native"`` (default: the process setting, see ``set_impl``).

    Returns:
      ``(*batch, *out_spatial, C)``, equal to ``flax.linen.max_pool``. The fast path's gradient equals
      flax's too, ties included (the first maximal element of a window in row-major order gets
      it); for inputs holding NaN or windows that are all ``-inf`` it is unspecified. Integer
      inputs take the native path.
    """
    if not use_fast(impl) or not jnp.issubdtype(inputs.dtype, jnp.floating):
        # Keywords, as flax documents them: jax2onnx's ONNX export patches flax's pooling with
        # keyword-only functions (`jnn.export`).
        return nn.max_pool(inputs, window_shape=tuple(window_shape), strides=tuple(strides) if strides else None,
                           padding=padding)
    window, strides, pads, out = _pool_geometry(inputs, window_shape, strides, padding)
    x = _pad_spatial(inputs, pads, -jnp.inf) if any(lo or hi for lo, hi in pads) else inputs
    return _max_of_slices(x, window, strides, out)


def avg_pool(inputs: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: Padding = "VALID", count_include_pad: bool = True, *,
             impl: str | None = None) -> jax.Array:
    """``flax.linen.avg_pool``, computed as a sum of strided slices on CPU.

    Args:
      inputs: ``(*batch, *spatial, C)``; ``len(window_shape)`` spatial dims.
      window_shape: window size per spatial dim.
      strides: stride per spatial dim (default 1).
      padding: ``"VALID"``, ``"SAME"`` or one ``(low, high)`` pair per spatial dim (zeros).
      count_include_pad: divide by the whole window size (True) or by the number of elements
        that are not padding.
      impl: ``"auto"``, ``"fast"`` or ``"native"`` (default: the process setting).

    Returns:
      ``(*batch, *out_spatial, C)``: flax's average, up to the rounding of its float sums.
    """
    if not use_fast(impl) or not jnp.issubdtype(inputs.dtype, jnp.floating):
        return nn.avg_pool(inputs, window_shape=tuple(window_shape), strides=tuple(strides) if strides else None,
                           padding=padding, count_include_pad=count_include_pad)
    window, strides, pads, out = _pool_geometry(inputs, window_shape, strides, padding)
    x = _pad_spatial(inputs, pads, 0) if any(lo or hi for lo, hi in pads) else inputs
    y = functools.reduce(jnp.add, _window_slices(x, window, strides, out))
    if count_include_pad or not any(lo or hi for lo, hi in pads):
        return y / np.prod(window)
    spatial = inputs.shape[inputs.ndim - len(window) - 1:-1]
    ones = _pad_spatial(jnp.ones((*spatial, 1), inputs.dtype), pads, 0)
    counts = functools.reduce(jnp.add, _window_slices(ones, window, strides, out))  # (*out, 1)
    return y / counts.reshape((1,) * (y.ndim - counts.ndim) + counts.shape)


# -------------------------------------------------------------------------------- convolution


def _is_channels_last(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
    """Whether the convolution is in flax's layout: (N, *spatial, C) input, (*K, I, O) kernel."""
    n = lhs.ndim
    nhwc = ((0, n - 1, *range(1, n - 1)), (n - 1, n - 2, *range(n - 2)), (0, n - 1, *range(1, n - 1)))
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return tuple(map(tuple, dims)) == nhwc


def _conv_by_taps(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                  pads: Sequence[tuple[int, int]], out_spatial: tuple[int, ...], precision: Any) -> jax.Array:
    """The channels-last convolution as matrix products over the kernel taps.

    Tap ``t`` of the kernel sees the strided slice ``x_t`` of the padded input, so the output is
    ``sum_t x_t @ kernel_t`` with ``x_t`` laid out (I, N), ``N = B * out positions``; with few input
    channels the taps are stacked into one (taps * I, N) operand. Only its transpose with respect
    to ``kernel`` runs in a gradient: ``x_t^T g``, (I, N) @ (N, O) per tap.

    Args:
      x: (B, *spatial, I); kernel: (*K, I, O).

    Returns:
      (B, *out_spatial, O).
    """
    nd = kernel.ndim - 2
    cin, cout = kernel.shape[-2:]
    xt = jnp.moveaxis(_pad_spatial(x, pads, 0), -1, 0)  # (I, B, *padded spatial)
    # A trailing unit axis gives the slices the (*batch, *spatial, C) layout they expect.
    taps = [t.reshape(cin, -1) for t in _window_slices(xt[..., None], kernel.shape[:nd], strides,
                                                          out_spatial)]  # (I, N) each
    k = kernel.reshape(-1, cin, cout)  # (taps, I, O)
    to_nc = (((0,), (0,)), ((), ()))  # (I, N) x (I, O) -> (N, O)
    if cin <= _STACKED_TAPS_MAX_CHANNELS:
        y = lax.dot_general(jnp.concatenate(taps), k.reshape(-1, cout), to_nc, precision=precision)
    else:
        y = functools.reduce(jnp.add, (lax.dot_general(t, kt, to_nc, precision=precision)
                                       for t, kt in zip(taps, k)))
    return y.reshape(x.shape[0], *out_spatial, cout)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, pads, dimension_numbers, precision):
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=dimension_numbers,
                                    precision=precision)


def _conv_jvp(strides, pads, dimension_numbers, precision, primals, tangents):
    # Linear in each argument: XLA's convolution for the input's tangent (its transpose, the input
    # gradient, is as fast as the forward) and the per-tap products for the kernel's (whose
    # transpose is the kernel gradient).
    x, kernel = primals
    tx, tk = tangents
    y = _conv(x, kernel, strides, pads, dimension_numbers, precision)
    terms = []
    if not isinstance(tx, SymbolicZero):
        terms.append(lax.conv_general_dilated(tx, kernel, strides, pads, dimension_numbers=dimension_numbers,
                                              precision=precision))
    if not isinstance(tk, SymbolicZero):
        terms.append(_conv_by_taps(x, tk, strides, pads, y.shape[1:-1], precision))
    return y, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Padding,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, *, impl: str | None = None) -> jax.Array:
    """``jax.lax.conv_general_dilated`` whose kernel gradient is computed per tap on CPU.

    The fast path covers flax's channels-last layout without dilation or feature groups, on
    floating inputs with at most 16 input channels, while nothing (such as qwix's quantization)
    intercepts ``lax.conv_general_dilated``; every other call is ``lax.conv_general_dilated`` itself. The forward value
    and the input gradient are XLA's in both paths; the kernel gradient differs from XLA's only
    by the order of its float sums.

    It takes ``lax.conv_general_dilated``'s arguments (``lhs`` to ``preferred_element_type``), and:

    Args:
      impl: ``"auto"``, ``"fast"`` or ``"native"`` (default: the process setting).
    """
    nd = lhs.ndim - 2
    if use_fast(impl) and compiler.options_active() and not _conv_intercepted():
        # Compiled by `jnn.jit` (XLA's Eigen convolution): XLA's own kernel gradient, from an
        # input that the backward pass reads instead of recomputing.
        return lax.conv_general_dilated(_materialized(lhs), rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        batch_group_count, precision, preferred_element_type)
    fast = (use_fast(impl) and _is_channels_last(lhs, rhs, dimension_numbers)
            and all(d == 1 for d in lhs_dilation or (1,)) and all(d == 1 for d in rhs_dilation or (1,))
            and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
            and rhs.shape[-2] <= _TAPS_MAX_CHANNELS and not _conv_intercepted()
            and jnp.issubdtype(lhs.dtype, jnp.floating) and lhs.dtype == rhs.dtype)
    if not fast:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count,
                                        precision, preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    pads = (lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:nd], strides, padding)
            if isinstance(padding, str) else padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _conv(lhs, rhs, strides, pads, dimension_numbers, precision)


def _materialized(x: jax.Array) -> jax.Array:
    """``x``, computed once into its own buffer: the identity, through a conditional.

    The kernel gradient of XLA's convolution reads its input transposed. Left alone, XLA fuses
    the elementwise ops that produced the input (a ResNet's BatchNorm, ReLU and residual sums,
    back through several blocks) into that transpose and recomputes them there, in an order that
    misses the cache: 146 ms of a 1,020 ms ResNet-20 backward pass in one transpose
    (`benchmarks/studies/README.md`). XLA does not fuse across a conditional, and
    ``lax.optimization_barrier`` is removed on CPU before fusion, so both branches return ``x``.
    """
    if x.size == 0:
        return x
    first = x.reshape(-1)[0]
    # XLA replaces a conditional whose branches are the same by that branch: the other one adds
    # 0 (and is taken only if the first element is NaN; it can turn -0.0 into 0.0).
    return lax.cond(first == first, lambda v: v, lambda v: v + 0, x)


def _conv_intercepted() -> bool:
    """Whether something (qwix's quantization) has replaced ``jax.lax.conv_general_dilated``."""
    return lax.conv_general_dilated is not _LAX_CONV or _LAX_CONV.__code__ is not _LAX_CONV_CODE


class Conv(nn.Conv):
    """``flax.linen.Conv`` with jnn's ``conv_general_dilated`` (a faster kernel gradient on CPU).

    Same attributes, parameter names, shapes and initialisation as ``flax.linen.Conv``, so
    parameter trees and checkpoints are interchangeable. Pass
    ``conv_general_dilated=jax.lax.conv_general_dilated`` to force XLA's native op for one layer.
    """

    conv_general_dilated: Any = conv_general_dilated
