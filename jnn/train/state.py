"""TrainState: the one pytree a training run needs to resume, and its constructor.

Modelled on `flax.training.train_state.TrainState`, with two additions that make a step pure and
resumable: the non-trainable collections (`model_state`, e.g. BatchNorm's `batch_stats`) and the
random key (`rng`). Per-step randomness is `fold_in(key, step)`, so nothing random is stored per call.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jnn.train import model as model_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model was initialised with and what it returns, used to validate batches.

    Attributes:
      inputs: per input array (one, or one per leaf of a tuple/dict of inputs): its path in the
        inputs ("" for a single array), per-example shape (without the batch axis) and dtype name.
      input_tree: the pytree structure of the inputs.
      output_shape: per-example output shape when the model returns one array (e.g. `(10,)` for
        10 classes); `()` when it returns a tuple, dict or scalar.
      output_kind: "array" when the model returns one array, else a short description of what it
        returns (e.g. "dict with keys ['logits', 'aux']").
    """

    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    input_tree: Any
    output_shape: tuple[int, ...]
    output_kind: str = "array"

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-example shape of the (first) input array."""
        return self.inputs[0][1]

    @property
    def dtype(self) -> str:
        """The dtype name of the (first) input array."""
        return self.inputs[0][2]


InputSpec = ModelSpec  # deprecated alias (0.1): the spec also describes the outputs


def describe(tree: Any) -> str:
    """A short description of a model's output: "dict with keys [...]", "tuple of 3", "Array"."""
    if isinstance(tree, Mapping):
        return f"dict with keys {sorted(tree)}"
    if isinstance(tree, (tuple, list)):
        return f"{type(tree).__name__} of {len(tree)}"
    return type(tree).__name__


def make_spec(example_inputs: Any, outputs: Any) -> ModelSpec:
    """The `ModelSpec` of inputs (arrays or shapes) and the model's outputs on them (shapes)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(example_inputs)
    inputs = tuple((jax.tree_util.keystr(path), tuple(x.shape[1:]),
                    str(jax.dtypes.canonicalize_dtype(x.dtype)))  # float64 -> float32 unless x64
                   for path, x in leaves)
    if hasattr(outputs, "shape") and hasattr(outputs, "dtype"):
        shape = tuple(outputs.shape[1:]) if len(outputs.shape) >= 1 else ()
        return ModelSpec(inputs, tree, shape, "array" if len(outputs.shape) >= 1 else "scalar")
    return ModelSpec(inputs, tree, (), describe(outputs))


class TrainState(struct.PyTreeNode):
    """Everything a training step reads and writes, as one pytree.

    Attributes:
      step: scalar int32 step counter.
      params: trainable parameters (linen's "params" collection; an nnx module's `nnx.Param` variables),
        as nested dicts of arrays.
      opt_state: the optax optimizer state.
      model_state: the model's other variables (linen: collections such as `{"batch_stats": ...}`;
        nnx: every non-parameter variable, e.g. BatchNorm's running statistics); `{}` when none.
      rng: the run's PRNG key as its raw uint32 data (`jax.random.key_data`), with `rng_impl`
        naming its implementation; `state.key` is the typed key, and the step derives its
        randomness as `fold_in(state.key, step)`. Raw data, not a typed key: a jitted step returns
        the state, and rebuilding a typed key from its output costs ~20-35 us of Python per call
        (measured in `benchmarks/studies/README.md`), a tenth of a tiny model's step. A typed key put
        here (`state.replace(rng=jax.random.key(1))`) works too.
      model: how jnn runs the model (static; `jnn.train.model.LinenModel` or `NnxModel`).
      tx: the optax transformation (static).
      spec: static input/output description used to validate batches before compiling.
      loss_scale: the dynamic loss scale of a float16 precision policy (`jnn.precision`), else None.
      rng_impl: the PRNG implementation of `rng` (static; e.g. "threefry2x32"; None: JAX's default).
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    model_state: PyTree
    rng: jax.Array
    model: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    spec: ModelSpec | None = struct.field(pytree_node=False, default=None)
    loss_scale: Any = None
    rng_impl: str | None = struct.field(pytree_node=False, default=None)

    @property
    def key(self) -> jax.Array:
        """`rng` as a typed PRNG key."""
        if jax.dtypes.issubdtype(self.rng.dtype, jax.dtypes.prng_key):
            return self.rng
        return jax.random.wrap_key_data(self.rng, impl=self.rng_impl)

    def apply_gradients(self, grads: PyTree, model_state: PyTree | None = None, **extra_args: Any) -> "TrainState":
        """Returns the state after one optimizer update with `grads`.

        Args:
          grads: gradients with the structure of `params`.
          model_state: new non-trainable collections (e.g. updated `batch_stats`); unchanged if None.
          **extra_args: passed to optimizers that take them (`optax.GradientTransformationExtraArgs`,
            e.g. `value=loss` for `optax.contrib.reduce_on_plateau`); ignored by the others.
        """
        if isinstance(self.tx, optax.GradientTransformationExtraArgs):
            updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
        else:
            updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(
            step=self.step + 1,
            params=params,
            opt_state=opt_state,
            model_state=self.model_state if model_state is None else model_state,
        )

    @property
    def apply_fn(self) -> Callable[..., Any]:
        """A flax-style `apply(variables, *args, **kwargs)`: linen's `module.apply`; for nnx, the
        merged module in eval mode."""
        return self.model

    @property
    def variables(self) -> dict[str, PyTree]:
        """The variables `apply_fn` takes: `{"params": ..., **model_state}` (nnx: `{"params", "state"}`)."""
        return self.model.variables(self.params, self.model_state)


_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _as_inputs(example_inputs: Any, where: str) -> Any:
    """Example inputs as a pytree of arrays, each with the same leading batch axis."""
    inputs = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), example_inputs)
    leaves = jax.tree_util.tree_leaves_with_path(inputs)
    if not leaves:
        raise ValueError(f"{where}: example_inputs holds no arrays; expected an array (or a tuple/dict "
                         f"of arrays) with a leading batch axis, e.g. x[:1].")
    sizes = {}
    for path, x in leaves:
        name = "example_inputs" + jax.tree_util.keystr(path)
        if x.ndim < 1:
            raise ValueError(f"{where}: {name} must have a leading batch axis; got a scalar. Pass a "
                             f"batch such as x[:1].")
        sizes[name] = x.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{where}: the input arrays have different batch sizes {sizes}; expected one "
                         f"leading batch axis shared by all. Fix: slice every input the same way, x[:1].")
    return inputs


def _seed(rng: Any) -> int | None:
    if isinstance(rng, (bool, np.bool_)):
        raise ValueError(f"create_train_state: rng={rng!r}; expected a PRNG key or an int seed.")
    if not isinstance(rng, (int, np.integer)):
        return None
    seed = int(rng)
    if not 0 <= seed < 2**32:
        raise ValueError(f"create_train_state: an int seed must be in [0, 2**32); got {seed}. "
                         f"Fix: use a non-negative seed such as 0.")
    return seed


class _Init(NamedTuple):
    """A pure initialisation `fn(*args) -> (params, opt_state, model_state, rng)` and its `finish`.

    `finish(parts, step, shapes)` wraps the parts (concrete, abstract or stacked) into a
    `TrainState`; `shapes` are one member's parts, for what is learnt from the model's shapes.
    """

    fn: Callable
    args: tuple
    finish: Callable


def _state_rng(rng: Any, seed: int | None) -> jax.Array:
    rng = jax.random.key(rng) if seed is not None else rng
    return jax.random.split(rng, 4)  # params, (two unused: kept so seeds give the same states), state


def _key_impl(rng: Any, seed: int | None) -> str:
    return str(jax.random.key_impl(jax.random.key(0) if seed is not None else rng))


def _initializer(model: Any, tx: optax.GradientTransformation, example_inputs: Any, rng: Any,
                 init_kwargs: dict[str, Any], train_kwarg: str | None, rng_streams) -> _Init:
    seed = _seed(rng)
    key = np.uint32(seed) if seed is not None else rng
    impl = _key_impl(rng, seed)
    example_inputs = _as_inputs(example_inputs, "create_train_state")
    model_lib.check_call_args(model, example_inputs, "create_train_state")

    if model_lib.is_nnx(model):
        from jnn.train import nnx_model  # noqa: PLC0415 - flax.nnx takes 0.15 s to import; linen runs skip it

        if train_kwarg not in (model_lib.AUTO, None) or init_kwargs or rng_streams:
            raise ValueError(
                "create_train_state: an nnx module is already initialised and switches mode with "
                ".train()/.eval(); train_kwarg=, rng_streams= and init keyword arguments apply to "
                "linen modules only. Fix: drop them.")
        adapter, params, model_state = nnx_model.split_nnx(model)

        def nnx_init(rng, x, params, model_state):
            return params, tx.init(params), model_state, jax.random.key_data(_state_rng(rng, seed)[3])

        def nnx_finish(parts, step, shapes):
            params, opt_state, model_state, state_rng = parts
            outputs, _ = jax.eval_shape(lambda p, s, x: adapter.apply(p, s, x, train=True, rng=jax.random.key(0)),
                                        shapes[0], shapes[2], example_inputs)
            return TrainState(step=step, params=params, opt_state=opt_state, model_state=model_state,
                              rng=state_rng, rng_impl=impl, model=adapter, tx=tx,
                              spec=make_spec(example_inputs, outputs))

        return _Init(nnx_init, (key, example_inputs, params, model_state), nnx_finish)

    if not model_lib.is_linen(model):
        raise ValueError(
            f"create_train_state: expected a flax.linen.Module or a flax.nnx.Module, got "
            f"{type(model).__name__}. Fix: define the model with flax (linen's nn.Module or nnx.Module).")
    mode = model_lib.find_mode_keyword(model, train_kwarg)
    eval_kwargs = mode.kwargs(False) if mode is not None else {}

    def linen_init(rng, x):
        param_rng, _, _, state_rng = _state_rng(rng, seed)
        with model_lib._batch_norm_axis(None):
            variables = dict(model.init({"params": param_rng}, *model_lib.call_args(x), **eval_kwargs,
                                        **init_kwargs))
        params = variables.pop("params", {})
        variables.pop("intermediates", None)
        return params, tx.init(params), variables, jax.random.key_data(state_rng)

    def linen_finish(parts, step, shapes):
        params, opt_state, variables, state_rng = parts
        adapter, outputs = model_lib.linen_model(model, {"params": shapes[0], **shapes[2]}, example_inputs,
                                                 mode=mode, train_kwarg=train_kwarg, rng_streams=rng_streams)
        model_state = {c: variables[c] for c in adapter.collections}
        return TrainState(step=step, params=params, opt_state=opt_state, model_state=model_state,
                          rng=state_rng, rng_impl=impl, model=adapter, tx=tx,
                          spec=make_spec(example_inputs, outputs))

    return _Init(linen_init, (key, example_inputs), linen_finish)


def create_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    example_inputs: Any,
    rng: jax.Array | int,
    *,
    fast_compile: bool = True,
    train_kwarg: str | None = model_lib.AUTO,
    rng_streams: tuple[str, ...] | None = None,
    precision: Any = None,
    **init_kwargs: Any,
) -> TrainState:
    """Initialises a flax model (linen or nnx) and its optimizer into a `TrainState`.

    Example:
      >>> state = jnn.create_train_state(MyModel(), optax.adam(1e-3), x[:1], jax.random.key(0))

    Args:
      model: a `flax.linen.Module` (initialised here, in eval mode, from `rng`) or a
        `flax.nnx.Module` (already initialised: its own parameters are used, and the module
        object is not changed). See `jnn.train.model` for how jnn runs each.
      tx: an optax `GradientTransformation` (see `jnn.optim.make_optimizer`).
      example_inputs: an input batch (any batch size, usually 1) of the shape and dtype the model
        will be trained on: one array, or a tuple (passed as positional arguments) or dict of
        arrays sharing a leading batch axis.
      rng: a PRNG key (`jax.random.key(seed)`) or an int seed.
      fast_compile: on CPU, compile the one-off initialisation without XLA's backend
        optimisations (several times faster to compile; parameters within 1 ulp of `model.init`).
      train_kwarg: linen only: the `__call__` keyword that switches train/eval mode. By default
        found by name (`train`, `training`, `is_training`, or inverted `deterministic`,
        `use_running_average`, `inference`); name another one here, or pass None for a model
        without one (silences the warning for a model with BatchNorm or Dropout).
      rng_streams: linen only: the rng stream names the model draws from, when jnn cannot find
        them itself (it runs the model once on shapes and provides every stream it asks for).
      precision: a `jnn.precision.Policy` or its name ("mixed_bf16", "mixed_f16", "float32"):
        the model then computes in the policy's dtype around float32 master parameters, and a
        float16 policy scales the loss dynamically (`state.loss_scale`).
      **init_kwargs: extra keyword arguments passed to `model.init` (linen).

    Returns:
      A `TrainState` with `step == 0`.

    Raises:
      ValueError: if `example_inputs` has no batch axis, the model is not a flax module, or
        `train_kwarg` names a keyword the model does not take.
    """
    init = _initializer(model, tx, example_inputs, rng, init_kwargs, train_kwarg, rng_streams)
    # Initialisation runs once, but XLA's CPU backend spends seconds optimising the random-number
    # code of every initializer; values differ from the optimised build by at most 1 ulp.
    options = _FAST_COMPILE if fast_compile and jax.default_backend() == "cpu" else None
    parts = jax.jit(init.fn).lower(*init.args).compile(options)(*init.args)
    return _with_precision(init.finish(parts, jax.device_put(np.zeros((), np.int32)), parts), precision,
                           init.args[1], type(model).__name__)  # the example inputs, as arrays


def _with_precision(state: TrainState, precision: Any, example_inputs: Any, name: str) -> TrainState:
    """`state` run under the policy `precision`: parameters (and a fresh optimizer state) in its
    parameter dtype, the policy in the model (a linen model's `dtype` set to the compute dtype),
    the initial loss scale. Refuses a policy the model would not follow (`check_in_effect`)."""
    from jnn import precision as precision_lib  # noqa: PLC0415 - jnn.precision imports jnn.optim

    policy = precision_lib.get(precision)
    if policy is None or policy.is_identity:
        return state
    params = precision_lib._cast_floats(state.params, policy.params)
    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state.params))
    opt_state = state.opt_state
    if any(a.dtype != b.dtype for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params))):
        opt_state = jax.eval_shape(state.tx.init, params) if abstract else state.tx.init(params)
    loss_scale = precision_lib.initial_loss_scale(policy)
    if abstract and loss_scale is not None:
        loss_scale = jax.eval_shape(lambda: loss_scale)
    model = precision_lib.in_compute_dtype(dataclasses.replace(state.model, precision=policy), policy)
    precision_lib.check_in_effect(model, params, state.model_state, example_inputs, policy, name)
    return state.replace(params=params, opt_state=opt_state, loss_scale=loss_scale, model=model)


def abstract_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    example_inputs: Any,
    rng: jax.Array | int,
    *,
    train_kwarg: str | None = model_lib.AUTO,
    rng_streams: tuple[str, ...] | None = None,
    precision: Any = None,
    **init_kwargs: Any,
) -> TrainState:
    """The `TrainState` `create_train_state` would return, as shapes only: nothing is computed.

    Every array leaf is a `jax.ShapeDtypeStruct`; the static fields (model, tx, spec) are real.
    Use it to compile a step ahead of time, before the real state exists:
    `jax.jit(step).lower(abstract_state, abstract_batch).compile()` fills jit's cache, so the first
    call with the real state does not compile again (or to inspect shapes and memory).

    Example:
      >>> shapes = jnn.abstract_train_state(model, optax.adam(1e-3), x[:1], 0)
      >>> shapes.params["Dense_0"]["kernel"]  # the model's first Dense layer, on flattened 8x8 digits
      ShapeDtypeStruct(shape=(64, 64), dtype=float32)
    """
    init = _initializer(model, tx, example_inputs, rng, init_kwargs, train_kwarg, rng_streams)
    parts = jax.eval_shape(init.fn, *init.args)
    return _with_precision(init.finish(parts, jax.ShapeDtypeStruct((), np.int32), parts), precision,
                           init.args[1], type(model).__name__)  # the example inputs, as arrays


def to_nnx(state: TrainState) -> Any:
    """The trained nnx module of a state made from an `nnx.Module` (a copy: the state stays valid).

    Its rng streams are reseeded from the state's key at its step, and its train/eval flags are
    those the module had when the state was created.

    Raises:
      ValueError: if the state was made from a linen module (use `state.variables` with `model.apply`).
    """
    if getattr(state.model, "kind", None) != "nnx":
        raise ValueError("to_nnx: the state was created from a linen module, which has no nnx form. "
                         "Fix: use module.apply(state.variables, x).")
    params = model_lib._model_params(state.model.reparam, state.params)  # e.g. LoRA adapters merged
    params, model_state = jax.tree.map(jnp.array, (params, state.model_state))
    return state.model.merge(params, model_state, jax.random.fold_in(state.key, state.step))
