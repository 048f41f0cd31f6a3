"""Multi-head self-attention through ``jax.nn.dot_product_attention``, with rotary positions.

``jax.nn.dot_product_attention`` dispatches to fused kernels: cuDNN flash attention on NVIDIA GPUs,
XLA elsewhere. JAX's own default (``implementation=None``) is XLA everywhere, which on a GPU
materialises the (B, N, T, T) scores; jnn's default picks cuDNN on a GPU for half-precision inputs
when cuDNN compiles that shape (probed once per shape, `resolve_implementation`), and XLA otherwise,
so the same module is fast on every platform without a flag. It has no attention-probability
dropout: models here apply dropout to the residual branches.

Its XLA path computes the softmax in float32 even for float64 inputs, which would make float64
gradient checks meaningless, so float64 models (and ``implementation="reference"``) use the
explicit einsum/softmax formulation instead, at full precision.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from jnn.precision import FLOAT32_ISLAND

IMPLEMENTATIONS: tuple[str | None, ...] = (None, "xla", "cudnn", "reference")
_HALF = (jnp.bfloat16, jnp.float16)


@functools.lru_cache(maxsize=None)
def _cudnn_compiles(shape: tuple[int, ...], dtype: str, causal: bool) -> bool:
    """Whether cuDNN flash attention, forward and backward, compiles for q = k = v of this shape."""
    spec = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))

    def loss(q, k, v):
        y = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        return y.astype(jnp.float32).sum()

    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    except Exception:  # noqa: BLE001 - any failure (shape, cuDNN version, no cuDNN) means "use XLA"
        return False
    return True


def resolve_implementation(implementation: str | None, q: jax.Array, causal: bool) -> str:
    """The attention implementation that runs for ``implementation`` and queries ``q``.

    An explicit choice is kept (``"cudnn"`` fails loudly where cuDNN cannot run it). ``None`` is
    ``"reference"`` for float64 and for float16 on a CPU, ``"cudnn"`` on a GPU for bfloat16 and
    float16 queries whose shape cuDNN compiles (one probe compile per shape, cached), and ``"xla"``
    otherwise.
    """
    if implementation is not None:
        return implementation
    if q.dtype == jnp.float64:
        return "reference"
    if q.dtype == jnp.float16 and jax.default_backend() == "cpu":
        return "reference"  # XLA's attention asks XLA:CPU for an F16 x F16 -> F32 product, which it refuses
    # cuDNN's support depends on the sequence, heads and head size, not the batch: probe batch 1.
    probe_shape = (1,) + tuple(q.shape[1:]) if q.ndim == 4 else tuple(q.shape)
    if jax.default_backend() == "gpu" and q.dtype in _HALF and _cudnn_compiles(probe_shape, q.dtype.name, causal):
        return "cudnn"
    return "xla"


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v; (B, T, N, H) in and out, in the inputs' dtype.

    Half-precision inputs are computed in float32 and the result cast back (as the fused kernels
    accumulate); float32 and float64 inputs are computed in their own dtype.
    """
    if jnp.dtype(q.dtype).itemsize < 4:
        with jax.named_scope(FLOAT32_ISLAND):  # float32 on purpose: not a policy the model ignores
            out = reference_attention(*(a.astype(jnp.float32) for a in (q, k, v)), causal)
        return out.astype(q.dtype)
    t, h = q.shape[1], q.shape[-1]
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k) / jnp.sqrt(h).astype(q.dtype)  # (B, N, T, T)
    if causal:
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]  # (1, 1, T, T)
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v)  # (B, T, N, H)


def apply_rotary(x: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), "rotate half" layout as GPT-NeoX/Llama.

    Args:
      x: (B, T, N, H) queries or keys, H even.
      base: wavelength base of the rotation frequencies.

    Returns:
      (B, T, N, H) with feature pairs (i, i + H/2) rotated by ``position * base**(-2i/H)``.
    """
    _, t, _, h = x.shape
    half = h // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / h)  # (H/2,)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]  # (T, H/2)
    cos = jnp.cos(angles)[None, :, None, :].astype(x.dtype)  # (1, T, 1, H/2)
    sin = jnp.sin(angles)[None, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]  # (B, T, N, H/2) each
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused QKV projection, attention, output projection.

    Input: (B, T, C) floats. Output: (B, T, C).

    Attributes:
      num_heads: attention heads N; C must be divisible by N.
      causal: mask attention to positions <= the query's (decoder).
      rotary: rotate queries and keys by their position (no learned position table needed).
      use_bias: biases on the projections.
      qkv_bias: biases on the query/key/value projection (None: ``use_bias``; Hugging Face's
        and timm's ViTs can leave them out while keeping the output projection's).
      kernel_init: initialiser of the QKV projection.
      out_kernel_init: initialiser of the output projection (GPT-2 scales it by depth).
      implementation: ``None`` (cuDNN on a GPU where it compiles, else XLA; see
        `resolve_implementation`), ``"xla"``, ``"cudnn"`` or ``"reference"`` (explicit softmax;
        always used for float64).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    num_heads: int
    causal: bool = False
    rotary: bool = False
    use_bias: bool = True
    qkv_bias: bool | None = None
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    out_kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_heads:
            raise ValueError(
                f"SelfAttention expected a width divisible by num_heads={self.num_heads}, "
                f"received width {c}. Change embed_dim or num_heads."
            )
        head_dim = c // self.num_heads
        if self.rotary and head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, received {head_dim}.")
        qkv_bias = self.use_bias if self.qkv_bias is None else self.qkv_bias
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), use_bias=qkv_bias,
                              kernel_init=self.kernel_init, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="qkv")(x)  # (B, T, 3, N, H)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, N, H) each
        if self.rotary:
            q, k = apply_rotary(q), apply_rotary(k)
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, "
                             f"received {self.implementation!r}.")
        impl = "reference" if q.dtype == jnp.float64 else \
            resolve_implementation(self.implementation, q, self.causal)
        if impl == "reference":
            y = reference_attention(q, k, v, self.causal)  # (B, T, N, H)
        else:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, implementation=impl)
        return nn.DenseGeneral(c, axis=(-2, -1), use_bias=self.use_bias,
                               kernel_init=self.out_kernel_init, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="out")(y)  # (B, T, C)
