"""Mixed precision: a policy declared once, applied to any flax model, and dynamic loss scaling.

A `Policy` names three dtypes: the parameters' (the float32 master copy the optimizer updates),
the computation's (what the model runs in) and the outputs' (what the loss sees). jnn applies it
around the model's apply, for linen and nnx models alike and without touching them: floating
parameters and inputs are cast to `compute` on the way in, floating outputs to `output` on the
way out, so the gradient reaches the float32 master parameters through the casts. Model state
(BatchNorm statistics) is not cast.

Casting the parameters is not enough when a model pins its computation dtype: a flax layer built
with `dtype=jnp.float32` promotes bfloat16 parameters back to float32 and runs its matrix product
in float32. Two rules follow (`in_compute_dtype`, `check_in_effect`):

- A linen model with a floating `dtype` attribute (flax's convention for the dtype a model computes
  in and passes down to its layers, as in jnn's zoo and flax's examples) runs as a clone with
  `dtype=compute` in the step (`state.apply_fn` stays the user's module). Layers that pin float32
  themselves (a float32 head, say) stay float32; `dtype=None` already follows the parameters.
- Then the model is traced once on shapes: if at least 90% of its matrix-product and convolution
  FLOPs would still run in float32, the policy would change nothing but add casts, and
  `create_train_state` refuses it with the modules that compute in float32 and how to fix them.
  (jnn's own float32 computations, such as a CPU's float16 attention, do not count.)

float16's range is narrow: small gradients underflow to zero. A float16 policy therefore scales
the loss (`loss_scale="dynamic"`): the step multiplies the loss by the current scale and divides
the gradients by it; when the gradients overflow the update is skipped (parameters, optimizer and
model state bitwise unchanged), the scale halves and the step reports it; after `period` good
steps in a row the scale doubles. bfloat16 has float32's range and needs none. In short::

  state = jnn.create_train_state(model, tx, x[:1], 0, precision="mixed_bf16")
  jnn train --set train.precision=mixed_f16
"""
from __future__ import annotations

import collections
import dataclasses
import math
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


def in_compute_dtype(model: Any, policy: Policy) -> Any:
    """A jnn model wrapper whose linen module computes in `policy.compute` (see the module doc).

    A linen module with a floating ``dtype`` field other than the compute dtype gets a clone with
    ``dtype=compute`` as its `compute_module` (the step runs it; `model.module`, which
    `state.apply_fn` runs, stays the user's). ``dtype=None`` (flax's "follow the parameters") and
    any other model are left as they are.
    """
    module = getattr(model, "module", None)
    if module is None or not dataclasses.is_dataclass(module) or \
            "dtype" not in {f.name for f in dataclasses.fields(module)} or module.dtype is None:
        return model
    try:
        dtype = jnp.dtype(module.dtype)
    except TypeError:  # not a dtype
        return model
    if not jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.dtype(policy.compute):
        return model
    return dataclasses.replace(model, compute_module=module.clone(dtype=getattr(jnp, policy.compute)))


FLOAT32_ISLAND = "jnn_float32_island"  # a name scope: products computed in float32 on purpose by jnn


def _sub_jaxprs(eqn):
    """The jaxprs nested in an equation's parameters (a scan or loop body, a cond's branches, a
    pjit / remat / custom_vjp body)."""
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(getattr(v, "jaxpr", None), "eqns"):
                yield v.jaxpr


def _product_flops(eqn) -> float:
    """FLOPs of a dot_general or conv_general_dilated equation (0 for anything else)."""
    out = math.prod(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "dot_general":
        (contracting, _), _ = eqn.params["dimension_numbers"]
        return 2.0 * out * math.prod(eqn.invars[0].aval.shape[d] for d in contracting)
    if eqn.primitive.name == "conv_general_dilated":
        kernel = eqn.invars[1].aval.shape
        return 2.0 * out * math.prod(kernel) / kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 0.0


def product_flops_by_dtype(jaxpr) -> tuple[dict[str, float], dict[str, float]]:
    """(FLOPs by operand dtype, float32-and-wider FLOPs by module path) of a jaxpr's matrix
    products and convolutions, nested jaxprs included: a scan body times its length, the most
    expensive branch of a cond, a while loop's body once. Products under jnn's float32-island
    name scope count in the first dict only."""

    def walk(j, prefix: str) -> tuple[dict, dict]:
        by_dtype: dict[str, float] = collections.defaultdict(float)
        wide: dict[str, float] = collections.defaultdict(float)
        for eqn in j.eqns:
            path = "/".join(p for p in (prefix, str(eqn.source_info.name_stack)) if p)
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                flops, dtype = _product_flops(eqn), jnp.dtype(eqn.invars[0].aval.dtype)
                by_dtype[dtype.name] += flops
                if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4 and FLOAT32_ISLAND not in path:
                    wide[path or "(top level)"] += flops
            subs = [walk(sub, path) for sub in _sub_jaxprs(eqn)]
            if eqn.primitive.name == "cond" and subs:  # one branch runs
                subs = [max(subs, key=lambda bw: sum(bw[0].values()))]
            times = float(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1.0
            for sub_dtype, sub_wide in subs:
                for k, v in sub_dtype.items():
                    by_dtype[k] += times * v
                for k, v in sub_wide.items():
                    wide[k] += times * v
        return by_dtype, wide

    by_dtype, wide = walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr, "")
    return dict(by_dtype), dict(wide)


REFUSE_FLOAT32_SHARE = 0.9  # the policy reaches at most 10% of the products: it is not in effect


def check_in_effect(model: Any, params: Any, model_state: Any, example_inputs: Any, policy: Policy,
                    name: str = "the model") -> None:
    """Refuses a half-precision policy that the model would not follow.

    Traces `model.apply` once on shapes (nothing is computed or compiled) and counts the FLOPs of
    its matrix products and convolutions by dtype. A model that keeps some layers in float32 on
    purpose (a float32 head) is accepted; one that would run at least 90% of those FLOPs in
    float32 or wider, so that the policy would add casts and change nothing else, is refused.

    Raises:
      ValueError: naming the modules that compute in float32, and the fixes.
    """
    if policy.compute == "float32":
        return

    def run(p, s, x):
        return model.apply(p, s, x, train=False, rng=jax.random.key(0))[0]

    by_dtype, wide = product_flops_by_dtype(jax.make_jaxpr(run)(params, model_state, example_inputs))
    total = sum(by_dtype.values())
    if not total or sum(wide.values()) < REFUSE_FLOAT32_SHARE * total:
        return
    top = sorted(wide.items(), key=lambda kv: -kv[1])[:5]
    where = ", ".join(f"{path} ({100 * f / total:.0f}%)" for path, f in top)
    wide_dtypes = sorted(d for d in by_dtype
                         if jnp.issubdtype(jnp.dtype(d), jnp.floating) and jnp.dtype(d).itemsize >= 4)
    linen = hasattr(model, "module")
    raise ValueError(
        f"precision policy compute={policy.compute!r}: {name} still runs "
        f"{100 * sum(wide.values()) / total:.0f}% of its matrix-product and convolution FLOPs in "
        f"{'/'.join(wide_dtypes)}, so the policy would add casts and change nothing else. Largest (by module "
        f"path): {where}. Its layers pin their computation dtype (flax `dtype=jnp.float32`). Fix: build those "
        f"layers with dtype=None (they then follow the {policy.compute} parameters) or dtype=jnp.{policy.compute}"
        + (", or give the top-level module a `dtype` attribute that it passes down to its layers (jnn sets it to "
           "the compute dtype)" if linen else "")
        + "; or train with precision='float32'.")


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


__all__ = ["DTYPES", "LOSS_SCALES", "POLICIES", "LossScaleState", "Policy", "adjust", "check_in_effect", "get",
           "in_compute_dtype", "initial_loss_scale", "product_flops_by_dtype"]
