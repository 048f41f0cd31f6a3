"""`Case`: one model, batch and loss under test, with what the checks share built once.

The state, the compiled train step, its result from the initial state, the step's exact gradient
and the compiled model are computed on first use and cached, so `check_model` runs every check on
one set of compiled programs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jnn import precision as precision_lib
from jnn.train.state import TrainState, create_train_state
from jnn.train.step import make_eval_step, make_train_step

PyTree = Any

# The optimizer of the checks' state: a real update with an optimizer state of the gradients'
# shape (momentum), and no Adam-style normalisation that would magnify float32 rounding noise
# into full-size steps when two computations of the same step are compared. After the first step
# its momentum is the step's gradient exactly (g + 0.9 * 0), which `gradient` reads.
CHECK_TX = optax.sgd(1e-2, momentum=0.9)

# Tolerances for two float computations of the same arithmetic in another order (compiled vs
# op by op, a batch vs its halves), by the dtype the model computes in.
REORDER_TOLERANCES = {"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2), "float16": (5e-3, 5e-3)}


@contextlib.contextmanager
def compiling_fast(on: bool = True):
    """Compiles what runs inside with `jax_disable_most_optimizations` on a CPU backend, then puts
    back the previous setting.

    The checks compile dozens of programs and run each once on one small batch, so XLA's backend
    optimisations (LLVM's, at level 0 here; the same HLO passes) cost more than they save. On the
    README's MLP, 2 interleaved runs each, load 1.1-1.3: `check_model` 11.7-11.8 s instead of
    14.6-15.6 s, `check_parallel` (8 devices, in its subprocess) 14.9-15.8 s instead of 19.3-20.0 s.
    The comparisons' tolerances do not change: this repository's tests of the checks run under the
    same setting. Not on GPU or TPU, where it would also turn off the autotuning a model's numbers
    may depend on.
    """
    if not on or jax.default_backend() != "cpu":
        yield
        return
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def gradient(opt_state: PyTree) -> PyTree:
    """The gradient of the first step from `CHECK_TX`'s state after it: its momentum."""
    return optax.tree_utils.tree_get(opt_state, "trace")


def take(tree: PyTree, index: Any) -> PyTree:
    """`x[index]` of every leaf (inputs, labels or outputs with a leading batch axis)."""
    return jax.tree.map(lambda x: np.asarray(x)[index], tree)


def batch_size(inputs: Any, where: str) -> int:
    leaves = jax.tree.leaves(inputs)
    if not leaves or any(np.ndim(x) < 1 for x in leaves):
        raise ValueError(f"{where}: expected inputs with a leading batch axis (an array, or a tuple/dict of "
                         f"arrays), got {type(inputs).__name__}. Fix: pass a batch such as x[:16].")
    size = np.shape(leaves[0])[0]
    if size < 4:
        raise ValueError(f"{where}: the batch has {size} examples; the checks need at least 4 (they compare a "
                         f"batch with its halves). Fix: pass 8-32 examples.")
    return size


@dataclasses.dataclass(eq=False)
class Case:
    """A model under test: the model, one batch, the loss, and an optional precision policy.

    Attributes:
      model: a flax.linen or flax.nnx module.
      inputs, labels: one batch (at least 4 examples).
      loss_fn: as for `jnn.make_train_step`.
      precision: a `jnn.precision.Policy` or name, or None.
      model_fn: `dtype -> model`, to build the model in float64 for the gradient check (optional;
        without it the check converts the model itself where it can).
      train_kwarg: as for `jnn.create_train_state` (linen).
      output_shapes: the expected per-example output shape (a tuple, or a pytree of tuples like
        the outputs), or None.
    """

    model: Any
    inputs: Any
    labels: Any
    loss_fn: Any = "cross_entropy"
    precision: Any = None
    model_fn: Callable[[Any], Any] | None = None
    train_kwarg: Any = "auto"
    output_shapes: Any = None

    def __post_init__(self):
        self.size = batch_size(self.inputs, "jnn.testing")
        self.inputs = jax.tree.map(np.asarray, self.inputs)
        self.labels = jax.tree.map(np.asarray, self.labels)
        self.batch = {"inputs": self.inputs, "labels": self.labels}
        self.traces = 0  # how often `train_step` was traced

    # --- the state and the compiled step ------------------------------------------------------

    @functools.cached_property
    def state(self) -> TrainState:
        return create_train_state(self.model, CHECK_TX, take(self.inputs, slice(0, 1)), 0,
                                  precision=self.precision, train_kwarg=self.train_kwarg)

    @functools.cached_property
    def step(self):
        """The uncompiled bare train step (run op by op when called directly): a non-finite update
        is applied, so the checks see it."""
        return make_train_step(self.loss_fn, on_nonfinite="apply")

    @functools.cached_property
    def train_step(self):
        """The compiled train step; `self.traces` counts its traces."""
        step = self.step

        def counted(state, batch):
            self.traces += 1
            return step(state, batch)

        return jax.jit(counted)

    @functools.cached_property
    def stepped(self) -> tuple[TrainState, dict]:
        """One compiled train step from the initial state: `(new_state, metrics)`."""
        return jax.device_get(self.train_step(self.state, self.batch))

    @property
    def step_grads(self) -> PyTree:
        """The gradient the train step computed from the initial state (exactly)."""
        return gradient(self.stepped[0].opt_state)

    @functools.cached_property
    def eval_step(self):
        return jax.jit(make_eval_step(self.loss_fn))

    # --- the model ----------------------------------------------------------------------------

    @functools.cached_property
    def _apply(self):
        model = self.state.model

        def run(params, model_state, inputs, rng, train):
            return model.apply(params, model_state, inputs, train=train, rng=rng)[0]

        return jax.jit(run, static_argnames="train")

    def outputs(self, inputs: Any, *, train: bool, rng: jax.Array | None = None) -> PyTree:
        """The model's outputs on `inputs` from the initial state (eval or train mode)."""
        rng = jax.random.key(0) if rng is None else rng
        return jax.device_get(self._apply(self.state.params, self.state.model_state, inputs, rng, train))

    @property
    def compute_dtype(self) -> str:
        policy = precision_lib.get(self.precision)
        return "float32" if policy is None else policy.compute

    @property
    def reorder_tolerance(self) -> tuple[float, float]:
        return REORDER_TOLERANCES[self.compute_dtype]

    def is_batched(self, leaf: Any) -> bool:
        return np.ndim(leaf) >= 1 and np.shape(leaf)[0] == self.size
