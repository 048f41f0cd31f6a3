"""Mixed precision: a policy declared once, applied to any flax model, and dynamic loss scaling.

A `Policy` names three dtypes: the parameters' (the float32 master copy the optimizer updates),
the computation's (what the model runs in) and the outputs' (what the loss sees). jnn applies it
around the model's apply, for linen and nnx models alike and without touching them: floating
parameters and inputs are cast to `compute` on the way in, floating outputs to `output` on the
way out, so the gradient reaches the float32 master parameters through the casts. Model state
(BatchNorm statistics) is not cast.

float16's range is narrow: small gradients underflow to zero. A float16 policy therefore scales
the loss (`loss_scale="dynamic"`): the step multiplies the loss by the current scale and divides
the gradients by it; when the gradients overflow the update is skipped (parameters, optimizer and
model state bitwise unchanged), the scale halves and the step reports it; after `period` good
steps in a row the scale doubles. bfloat16 has float32's range and needs none.

  state = jnn.create_train_state(model, tx, x[:1], 0, precision="mixed_bf16")
  jnn train --set train.precision=mixed_f16
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jnn._names import unknown
from jnn._names import check_fields

PyTree = Any
DTYPES = ("float32", "bfloat16", "float16")
LOSS_SCALES = ("none", "dynamic")


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype the parameters are kept in, the model computes in, and the outputs come out in.

    Attributes:
      params: the master parameters and the optimizer state ("float32").
      compute: what the model runs in ("bfloat16", "float16" or "float32").
      output: what the loss receives ("float32").
      loss_scale: "dynamic" (required for float16 compute) or "none".
      initial_scale: the first loss scale (2**15).
      period: good steps in a row after which the scale doubles.
    """

    params: str = "float32"
    compute: str = "float32"
    output: str = "float32"
    loss_scale: str = "none"
    initial_scale: float = 2.0 ** 15
    period: int = 2000

    def __post_init__(self):
        check_fields("Policy", self, {
            "params": (self.params in DTYPES, f"one of {list(DTYPES)}"),
            "compute": (self.compute in DTYPES, f"one of {list(DTYPES)}"),
            "output": (self.output in DTYPES, f"one of {list(DTYPES)}"),
            "loss_scale": (self.loss_scale in LOSS_SCALES, f"one of {list(LOSS_SCALES)}"),
            "initial_scale": (self.initial_scale >= 1, ">= 1"),
            "period": (self.period >= 1, ">= 1"),
        })
        if self.compute == "float16" and self.loss_scale == "none":
            raise ValueError(
                "Policy: compute='float16' with loss_scale='none'; float16 gradients underflow to zero "
                "without loss scaling. Fix: Policy(..., loss_scale='dynamic'), or the named policy "
                "'mixed_f16' (or compute in 'bfloat16', which needs none).")

    @property
    def is_identity(self) -> bool:
        return self.params == self.compute == self.output == "float32" and self.loss_scale == "none"

    def cast_to_compute(self, tree: PyTree) -> PyTree:
        return _cast_floats(tree, self.compute)

    def cast_to_output(self, tree: PyTree) -> PyTree:
        return _cast_floats(tree, self.output)


POLICIES = {
    "float32": Policy(),
    "mixed_bf16": Policy("float32", "bfloat16", "float32"),
    "mixed_f16": Policy("float32", "float16", "float32", loss_scale="dynamic"),
}


def get(policy: str | Policy | None) -> Policy | None:
    """A `Policy` from a name in `POLICIES` (or a `Policy`); None for None.

    Raises:
      ValueError: an unknown name (listing the valid ones).
    """
    if policy is None or isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise unknown("precision policy", policy, POLICIES)
    return POLICIES[policy]


def _cast_floats(tree: PyTree, dtype: str) -> PyTree:
    dtype = jnp.dtype(dtype)

    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, "sharding", None))
            return jnp.asarray(x, dtype) if isinstance(x, jax.Array) else np.asarray(x, dtype)
        return x

    return jax.tree.map(cast, tree)


class LossScaleState(NamedTuple):
    """The dynamic loss scale, part of the `TrainState` (checkpointed with it)."""

    scale: jax.Array  # float32
    good_steps: jax.Array  # int32: finite steps in a row since the last change


def initial_loss_scale(policy: Policy | None) -> LossScaleState | None:
    if policy is None or policy.loss_scale == "none":
        return None
    return LossScaleState(jnp.asarray(policy.initial_scale, jnp.float32), jnp.zeros((), jnp.int32))


def adjust(state: LossScaleState, finite: jax.Array, policy: Policy) -> LossScaleState:
    """The next loss scale: halved (at least 1) after an overflow, doubled after `period` good steps."""
    good = jnp.where(finite, state.good_steps + 1, 0)
    grow = good >= policy.period
    scale = jnp.where(finite, jnp.where(grow, state.scale * 2.0, state.scale), jnp.maximum(state.scale / 2.0, 1.0))
    return LossScaleState(scale.astype(jnp.float32), jnp.where(grow, 0, good).astype(jnp.int32))


__all__ = ["DTYPES", "LOSS_SCALES", "POLICIES", "LossScaleState", "Policy", "adjust", "get", "initial_loss_scale"]
