"""How jnn runs a user's model: one contract over flax.linen and flax.nnx modules.

The step never calls a module directly. It calls `state.model.apply(params, model_state, inputs,
train=..., rng=..., axis_name=...) -> (outputs, new_model_state)`, where `state.model` is one of two
small static values built once by `create_train_state`:

- `LinenModel` wraps a `flax.linen.Module` (`init` / `apply`). It knows the keyword that switches
  train/eval mode (`train=`, `training=`, `is_training=`, or the inverted `deterministic=`,
  `use_running_average=`, `inference=`), the rng streams the model draws from (found by running the
  model once on shapes, whatever their names), and which variable collections are state (updated
  and kept, e.g. `batch_stats`) as opposed to values the model `sow`s (dropped every step).
- `NnxModel` (in `jnn.train.nnx_model`) wraps a `flax.nnx.Module` through `nnx.split` / `nnx.merge`: the parameters
  (`nnx.Param`) and the other variables (batch statistics, counters) travel as plain nested dicts,
  the module is merged inside the traced step from them, put in `train()` or `eval()` mode, its rng
  streams reseeded from the step's key, and split again after the call.

Rules every model follows under jnn (documented in the README):

- Inputs: a tuple is passed as positional arguments (`model(ids, lengths)`); any other pytree
  (an array, a dict, a list) is passed as one argument.
- Randomness: each rng stream `name` gets `fold_in(step_key, crc32(name))`, where step_key is
  `fold_in(state.key, state.step)` (and the device index under pmap / shard_map).
- BatchNorm: every `nn.BatchNorm` / `nnx.BatchNorm` computes its statistics over the step's device
  axis (the whole global batch), whatever `axis_name` the model was written with; across devices
  only batch statistics are averaged, every other collection keeps its dtype and per-device value.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import sys
import warnings
import zlib
from typing import Any, Sequence

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any

# Mode keywords a model's `__call__` may take: True in training / True in evaluation.
TRAIN_KEYWORDS = ("train", "training", "is_training")
EVAL_KEYWORDS = ("deterministic", "use_running_average", "inference")
AUTO = "auto"  # create_train_state(train_kwarg=AUTO): find the mode keyword in the signature

_MAX_RNG_STREAMS = 64
_RNG_ERROR = re.compile(r'needs PRNG for "([^"]+)"')


# ----------------------------------------------------------------------------------------------
# Shared rules: randomness, inputs, the mode keyword.
# ----------------------------------------------------------------------------------------------


def stream_key(rng: jax.Array, name: str) -> jax.Array:
    """The key of rng stream `name` derived from a step key: `fold_in(rng, crc32(name))`."""
    return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def stream_keys(rng: jax.Array, names: Sequence[str]) -> dict[str, jax.Array]:
    return {name: stream_key(rng, name) for name in names}


def call_args(inputs: Any) -> tuple:
    """The positional arguments a batch's inputs become: a tuple is splatted, anything else is one."""
    return tuple(inputs) if isinstance(inputs, tuple) else (inputs,)


@dataclasses.dataclass(frozen=True)
class ModeKeyword:
    """The keyword that switches a linen model between training and evaluation.

    Attributes:
      name: the keyword, e.g. "train" or "deterministic".
      true_in_training: `train=True` in training (True), or `deterministic=False` (False).
    """

    name: str
    true_in_training: bool

    def kwargs(self, train: bool) -> dict[str, bool]:
        return {self.name: train if self.true_in_training else not train}


def find_mode_keyword(module: Any, train_kwarg: str | None = AUTO) -> ModeKeyword | None:
    """The mode keyword of a linen module's `__call__` (`train_kwarg=AUTO`), or the one named.

    Raises:
      ValueError: `train_kwarg` names a keyword the module's `__call__` does not take.
    """
    if train_kwarg is None:
        return None
    try:
        parameters = inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    if train_kwarg != AUTO:
        if train_kwarg not in parameters and not takes_kwargs:
            raise ValueError(
                f"create_train_state: train_kwarg={train_kwarg!r}, but {type(module).__name__}.__call__ "
                f"takes {list(parameters)}. Fix: name one of its keywords, or pass train_kwarg=None "
                f"for a model without a train/eval switch.")
        return ModeKeyword(train_kwarg, train_kwarg not in EVAL_KEYWORDS)
    for name in TRAIN_KEYWORDS + EVAL_KEYWORDS:
        if name in parameters:
            return ModeKeyword(name, name in TRAIN_KEYWORDS)
    return None


def check_call_args(module: Any, inputs: Any, where: str) -> None:
    """Refuses a tuple of inputs that the model's `__call__` cannot take as positional arguments."""
    if not isinstance(inputs, tuple) or not callable(module):
        return
    call, args = module.__call__, call_args(inputs)
    try:
        signature = inspect.signature(call)
    except (TypeError, ValueError):
        return
    try:
        bound = list(signature.bind_partial(*args).arguments)
        mode = [name for name in bound if name in TRAIN_KEYWORDS + EVAL_KEYWORDS]
        if mode:  # an input array would land in the train/eval keyword
            raise TypeError(f"input {bound.index(mode[0])} would be passed as the mode keyword {mode[0]!r}")
    except TypeError as err:
        raise ValueError(
            f"{where}: the inputs are a tuple of {len(args)} arrays, which jnn passes as {len(args)} "
            f"positional arguments, but {getattr(call, '__qualname__', call)} takes "
            f"{list(signature.parameters)} ({err}). Fix: pass a list or a dict to give the model one "
            f"argument, or accept {len(args)} arguments.") from None


def _batch_norm_axis(axis_name: str | None):
    """A linen interceptor that makes every `nn.BatchNorm` reduce its statistics over `axis_name`.

    The module it edits is the bound copy `apply` made for this call, never the user's module.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.BatchNorm) \
                or module.axis_name == axis_name:
            return next_fun(*args, **kwargs)
        original = module.axis_name
        object.__setattr__(module, "axis_name", axis_name)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "axis_name", original)

    return nn.intercept_methods(interceptor)


def _dropout_off():
    """A linen interceptor that runs every `nn.Dropout` with rate 0 (it then returns its input)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dropout) or module.rate == 0:
            return next_fun(*args, **kwargs)
        original = module.rate
        object.__setattr__(module, "rate", 0.0)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "rate", original)

    return nn.intercept_methods(interceptor)


def first_difference(expected: PyTree, got: PyTree, prefix: str = "params") -> str:
    """The first path where two parameter trees differ: a missing or extra entry, or a shape."""
    def shapes(tree):
        return {jax.tree_util.keystr(p): tuple(jnp.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    want, have = shapes(expected), shapes(got)
    for path in sorted(set(want) | set(have)):
        if path not in have:
            return f"{prefix}{path}: the model has it {want[path]}, the state does not"
        if path not in want:
            return f"{prefix}{path}: the state has it {have[path]}, the model does not"
        if want[path] != have[path]:
            return f"{prefix}{path}: the model expects shape {want[path]}, the state holds {have[path]}"
    return "(no difference in the parameters' paths and shapes)"


def other_model_error(where: str, difference: str) -> ValueError:
    return ValueError(
        f"{where}: the state's parameters do not belong to this model; first difference: {difference}. "
        f"Fix: create the state from this model (jnn.create_train_state), or load matching weights "
        f"(jnn.transfer.load_pretrained names every unmatched tensor).")


def _same_shapes(a: PyTree, b: PyTree) -> bool:
    """Same structure and shapes: a state collection; a sown one grows (its tuples get longer)."""
    shapes = lambda t: [tuple(jnp.shape(x)) for x in jax.tree.leaves(t)]  # noqa: E731
    return jax.tree.structure(a) == jax.tree.structure(b) and shapes(a) == shapes(b)


def _to_compute(policy, params: PyTree, inputs: Any) -> tuple[PyTree, Any]:
    """Floating parameters and inputs in the policy's compute dtype (the gradient flows back
    through the cast to the master parameters)."""
    if policy is None:
        return params, inputs
    return policy.cast_to_compute(params), policy.cast_to_compute(inputs)


def _model_params(reparam, params: PyTree) -> PyTree:
    return params if reparam is None else reparam(params)


def _to_output(policy, outputs: Any) -> Any:
    return outputs if policy is None else policy.cast_to_output(outputs)


# ----------------------------------------------------------------------------------------------
# flax.linen
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinenModel:
    """A flax.linen module as jnn runs it (static: part of the `TrainState`'s structure).

    Attributes:
      module: the user's module.
      mode: its train/eval keyword, or None.
      rng_streams: the rng stream names it draws from in training.
      collections: its state collections (e.g. ("batch_stats",)), mutable in training.
      sync_batch_norm: BatchNorm statistics over the step's device axis (False: per device).
      precision: a `jnn.precision.Policy` applied around every run (None: as the model is).
      reparam: a function from the state's params to the model's (e.g. `jnn.lora.LoRA`, which
        merges adapters into frozen weights), or None.
      compute_module: the module the step runs under a precision policy (the user's module with
        its `dtype` set to the compute dtype, `jnn.precision.in_compute_dtype`), or None: `module`.
        `module` itself stays the user's (`state.apply_fn`, quantization and export use it).
      dropout: False runs every dropout layer with rate 0, in training too (`jnn.testing`
        compares parallel paths that draw per-device masks this way).
    """

    module: nn.Module
    mode: ModeKeyword | None
    rng_streams: tuple[str, ...]
    collections: tuple[str, ...]
    sync_batch_norm: bool = True
    precision: Any = None
    reparam: Any = None
    compute_module: nn.Module | None = None
    dropout: bool = True

    kind = "linen"

    def variables(self, params: PyTree, model_state: PyTree) -> dict[str, PyTree]:
        return {"params": _model_params(self.reparam, params), **model_state}

    def __call__(self, variables: PyTree, *args, **kwargs):
        """`module.apply(variables, *args, **kwargs)`: flax's own apply, as `state.apply_fn`."""
        return self.module.apply(variables, *args, **kwargs)

    def apply(self, params: PyTree, model_state: PyTree, inputs: Any, *, train: bool,
              rng: jax.Array | None = None, axis_name: str | None = None) -> tuple[Any, PyTree]:
        """Runs the model; returns `(outputs, new_model_state)` (`model_state` itself in eval)."""
        params, inputs = _to_compute(self.precision, _model_params(self.reparam, params), inputs)
        mode = self.mode.kwargs(train) if self.mode is not None else {}
        rngs = stream_keys(rng, self.rng_streams) if rng is not None else {}
        # State collections are mutable in evaluation too (a model may update a counter on every
        # call); evaluation discards the updates.
        mutable = list(self.collections) if self.collections else False
        module = self.module if self.compute_module is None else self.compute_module
        try:
            with _batch_norm_axis(axis_name if self.sync_batch_norm else None), \
                    (contextlib.nullcontext() if self.dropout else _dropout_off()):
                out = module.apply({"params": params, **model_state}, *call_args(inputs), rngs=rngs,
                                   mutable=mutable, **mode)
        except (flax.errors.ScopeParamNotFoundError, flax.errors.ScopeParamShapeError) as err:
            expected = jax.eval_shape(lambda x: self.module.init(jax.random.key(0), *call_args(x),
                                                                 **(self.mode.kwargs(False) if self.mode else {})),
                                      inputs)["params"]
            raise other_model_error("the model", first_difference(expected, params)) from err
        if not mutable:
            return _to_output(self.precision, out), model_state
        outputs, updated = out
        return _to_output(self.precision, outputs), ({c: updated[c] for c in self.collections} if train else model_state)

    def batch_stats_flags(self, model_state: PyTree) -> list[bool]:
        """Per leaf of `model_state`: is it a BatchNorm statistic (averaged across devices)?"""
        return [bool(path) and getattr(path[0], "key", None) == "batch_stats"
                for path, _ in jax.tree_util.tree_flatten_with_path(model_state)[0]]


def linen_model(module: nn.Module, variables: PyTree, example_inputs: Any, *, mode: ModeKeyword | None,
                train_kwarg: str | None, rng_streams: Sequence[str] | None) -> tuple[LinenModel, Any]:
    """Builds the `LinenModel` of `module` from its initial variables (arrays or shapes).

    Runs the model once in training mode on shapes (nothing is computed) to learn the rng streams
    it draws from and which collections keep their structure (state) or grow (`sow`n values).

    Returns:
      The model and its training-mode output (shapes).
    """
    variables = dict(variables)
    variables.pop("intermediates", None)
    streams = list(rng_streams or ())
    train = mode.kwargs(True) if mode is not None else {}
    switched = set()  # names of the BatchNorm / Dropout layers the model calls

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, (nn.BatchNorm, nn.Dropout)):
            switched.add(type(context.module).__name__)
        return next_fun(*args, **kwargs)

    def run(v, x):
        rngs = stream_keys(jax.random.key(0), streams)
        with nn.intercept_methods(record), _batch_norm_axis(None):
            return module.apply(v, *call_args(x), rngs=rngs, mutable=True, **train)

    for _ in range(_MAX_RNG_STREAMS):
        try:
            outputs, updated = jax.eval_shape(run, variables, example_inputs)
            break
        except flax.errors.InvalidRngError as err:
            found = _RNG_ERROR.search(str(err))
            if found is None or found.group(1) in streams:
                raise ValueError(
                    f"create_train_state: {type(module).__name__} asks for an rng stream jnn could not "
                    f"name ({err}). Fix: list its streams, create_train_state(..., rng_streams=("
                    f"'dropout', ...)).") from err
            streams.append(found.group(1))
    collections = tuple(sorted(c for c in variables if c != "params" and c in updated
                               and _same_shapes(variables[c], updated[c])))
    if mode is None and train_kwarg == AUTO and switched:
        warnings.warn(
            f"create_train_state: {type(module).__name__} has {' and '.join(sorted(switched))} layers "
            f"but its __call__ takes none of the mode keywords {TRAIN_KEYWORDS + EVAL_KEYWORDS}, so jnn cannot "
            f"switch it between training and evaluation: it runs as written in both. Fix: name the "
            f"keyword, create_train_state(..., train_kwarg='my_flag'), or pass train_kwarg=None if "
            f"the model sets its mode another way.", stacklevel=3)
    return LinenModel(module, mode, tuple(sorted(streams)), collections), outputs


def is_linen(module: Any) -> bool:
    return isinstance(module, nn.Module)


def is_nnx(module: Any) -> bool:
    """Whether `module` is an `nnx.Module`, without importing flax.nnx (0.15 s, which a linen run
    skips): an nnx module exists only once its program imported flax.nnx."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(module, nnx.Module)
