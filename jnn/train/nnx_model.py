"""`NnxModel`: a flax.nnx module as jnn runs it, through `nnx.split` / `nnx.merge` (the contract
is described in `jnn.train.model`)."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jnn.train.model import _model_params, _to_compute, _to_output, call_args, other_model_error, stream_keys

PyTree = Any

# The variables that are model state (kept across steps): not parameters, not rng streams (reseeded
# every step), not sown intermediates.
_STATE = nnx.Not(nnx.Any(nnx.Param, nnx.RngState, nnx.Intermediate))


def _placeholder_key(shape: tuple[int, ...], impl: str) -> jax.Array:
    key = jax.random.key(0, impl=impl)
    return jax.random.split(key, shape) if shape else key


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


# The streams of the `nnx.Rngs` a module that takes its rngs at call time receives; any other
# stream it asks for (`rngs.noise()`) falls back to "default", as in `nnx.Rngs` itself.
CALL_STREAMS = ("default", "dropout")


def _takes_call_rngs(module: nnx.Module) -> bool:
    """`__call__(self, x, *, rngs)`: the module takes its `nnx.Rngs` at call time (flax's NNX
    randomness guide and MNIST example write dropout this way)."""
    try:
        return "rngs" in inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True, eq=False)
class NnxModel:
    """A flax.nnx module as jnn runs it: a graph definition and the structure of its state.

    `params` and `model_state` of the `TrainState` are plain nested dicts of arrays
    (`nnx.State.to_pure_dict()`); the module is merged from them inside the traced step.
    """

    graphdef: Any
    params_def: Any  # treedefs of the nnx.State parts, to rebuild them from the dicts' leaves
    state_def: Any
    rng_def: Any
    rng_leaves: tuple[tuple[tuple[int, ...], str, str | None], ...]  # (shape, dtype, key impl)
    rng_tags: tuple[str, ...]
    batch_stats: tuple[bool, ...]  # per model_state leaf
    call_rngs: bool = False  # __call__ takes `rngs`: jnn passes an nnx.Rngs derived from the step key
    sync_batch_norm: bool = True
    dropout: bool = True  # False: every nnx.Dropout runs with rate 0 (see LinenModel.dropout)
    param_paths: tuple[str, ...] = ()  # the parameters' paths, to name the first one a foreign state lacks
    precision: Any = None  # a jnn.precision.Policy applied around every run
    reparam: Any = None  # state params -> the module's (e.g. jnn.lora.LoRA)

    kind = "nnx"

    def _key(self):
        return (self.graphdef, self.params_def, self.state_def, self.rng_def, self.rng_leaves,
                self.rng_tags, self.batch_stats, self.call_rngs, self.sync_batch_norm, self.dropout,
                self.param_paths, self.precision, self.reparam)

    def __eq__(self, other):
        return isinstance(other, NnxModel) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def variables(self, params: PyTree, model_state: PyTree) -> dict[str, PyTree]:
        return {"params": _model_params(self.reparam, params), "state": model_state}

    def merge(self, params: PyTree, model_state: PyTree, rng: jax.Array | None = None) -> nnx.Module:
        """The module, rebuilt from `params` and `model_state` (its rng streams reseeded from `rng`)."""
        paths = tuple(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
        if self.param_paths and paths != self.param_paths:
            missing = [p for p in self.param_paths if p not in paths]
            extra = [p for p in paths if p not in self.param_paths]
            raise other_model_error("the nnx model", f"params{missing[0]}: the model has it, the state does not"
                                    if missing else f"params{extra[0]}: the state has it, the model does not")
        placeholders = [_placeholder_key(shape, impl) if impl else jnp.zeros(shape, dtype)
                        for shape, dtype, impl in self.rng_leaves]
        module = nnx.merge(self.graphdef, jax.tree.unflatten(self.params_def, jax.tree.leaves(params)),
                           jax.tree.unflatten(self.state_def, jax.tree.leaves(model_state)),
                           jax.tree.unflatten(self.rng_def, placeholders))
        if self.rng_tags:
            key = jax.random.key(0) if rng is None else rng
            nnx.reseed(module, policy="match_shape", **stream_keys(key, self.rng_tags))
        return module

    def _call_kwargs(self, rng: jax.Array | None) -> dict[str, Any]:
        """`{"rngs": nnx.Rngs(...)}` with each stream `fold_in(rng, crc32(name))`, for a module
        that takes its rngs at call time; `{}` for the others."""
        if not self.call_rngs:
            return {}
        return {"rngs": nnx.Rngs(**stream_keys(jax.random.key(0) if rng is None else rng, CALL_STREAMS))}

    def __call__(self, variables: PyTree, *args, rngs: jax.Array | None = None):
        """The module in eval mode on `args`, from `{"params": ..., "state": ...}` (as `state.apply_fn`)."""
        module = self.merge(variables["params"], variables["state"], rngs)
        module.eval()
        return module(*args, **self._call_kwargs(rngs))

    def apply(self, params: PyTree, model_state: PyTree, inputs: Any, *, train: bool,
              rng: jax.Array | None = None, axis_name: str | None = None) -> tuple[Any, PyTree]:
        params, inputs = _to_compute(self.precision, _model_params(self.reparam, params), inputs)
        module = self.merge(params, model_state, rng)
        module.train() if train else module.eval()
        for _, sub in nnx.iter_modules(module):
            if isinstance(sub, nnx.BatchNorm):
                sub.axis_name = axis_name if self.sync_batch_norm else None
            elif isinstance(sub, nnx.Dropout) and not self.dropout:
                sub.rate = 0.0
        outputs = module(*call_args(inputs), **self._call_kwargs(rng))
        new_state = _pure(nnx.state(module, _STATE))
        if jax.tree.structure(new_state) != jax.tree.structure(model_state):
            raise ValueError(
                f"the nnx model created or removed variables while running (state before: "
                f"{jax.tree.structure(model_state)}, after: {jax.tree.structure(new_state)}). jnn keeps "
                f"a fixed set of variables between steps. Fix: create every variable in __init__ "
                f"(sown values, nnx.Intermediate, are dropped).")
        return _to_output(self.precision, outputs), new_state

    def batch_stats_flags(self, model_state: PyTree) -> list[bool]:
        return list(self.batch_stats)


def split_nnx(module: nnx.Module) -> tuple[NnxModel, dict, dict]:
    """`(model, params, model_state)` of an nnx module; the user's module is not changed."""
    graphdef, params, state, rngs, rest = nnx.split(module, nnx.Param, _STATE, nnx.RngState, ...)
    if jax.tree.leaves(rest):  # sown intermediates from an earlier call: drop them from a copy
        module = nnx.clone(module)
        nnx.pop(module, nnx.Intermediate)
        graphdef, params, state, rngs = nnx.split(module, nnx.Param, _STATE, nnx.RngState)
    pure_params, pure_state = _pure(params), _pure(state)
    for part, pure in ((params, pure_params), (state, pure_state)):
        if any(a is not b for a, b in zip(jax.tree.leaves(part), jax.tree.leaves(pure))):
            raise ValueError("create_train_state: could not map the nnx state to plain arrays "
                             "(leaf order differs); please report this model to jnn.")
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731
    rng_leaves = tuple((tuple(x.shape), str(x.dtype), str(jax.random.key_impl(x)) if is_key(x) else None)
                       for x in jax.tree.leaves(rngs))
    variables = lambda s: jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, nnx.Variable))  # noqa: E731
    tags = sorted({v.tag for v in variables(rngs) if isinstance(v, nnx.RngKey)})
    flags = tuple(isinstance(v, nnx.BatchStat) for v in variables(state))
    model = NnxModel(graphdef, jax.tree.structure(params), jax.tree.structure(state), jax.tree.structure(rngs),
                     rng_leaves, tuple(tags), flags, _takes_call_rngs(module),
                     param_paths=tuple(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(pure_params)))
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731 - a donated step must not free the module's arrays
    return model, copy(pure_params), copy(pure_state)

