"""Reduce the learning rate when an evaluation metric stops improving: `Plateau`, an optax
transform whose state the loop advances after each evaluation (`jnn.fit(..., plateau=...)`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jnn._names import check_fields

PyTree = Any
PLATEAU_MODES = ("min", "max")


class PlateauState(NamedTuple):
    """The learning-rate scale of a `Plateau` and its counters, in the optimizer state (so
    checkpoints keep them and a resumed run continues them)."""

    scale: jax.Array  # float32: what every update is multiplied by
    best: jax.Array  # float32: the best metric so far, as a value to minimise (+inf at first)
    bad_evals: jax.Array  # int32: evaluations since the last improvement
    cooldown_left: jax.Array  # int32: evaluations still ignored after a reduction


@dataclasses.dataclass(frozen=True)
class Plateau:
    """Reduce the learning rate when an evaluation metric stops improving (Keras' and PyTorch's
    ReduceLROnPlateau).

    `optax.contrib.reduce_on_plateau` reads a value at every step (the training loss) and only
    minimises: negating a metric to maximise it turns its relative tolerance around (an
    accuracy that did not change counts as an improvement). This one is driven by the
    evaluation and takes a mode, with the same rule otherwise (improved when better than the best
    by more than `atol + rtol * |best|`; reduce after `patience` evaluations without; then
    `cooldown` evaluations ignored). Put `transform()` in the optimizer chain and pass the same
    `Plateau` to `jnn.fit(..., plateau=...)`, which calls `update` after every evaluation.

    Example:
      >>> plateau = jnn.optim.Plateau("accuracy", mode="max", factor=0.5, patience=2)
      >>> tx = optax.chain(optax.adam(1e-3), plateau.transform())
      >>> state = jnn.create_train_state(model, tx, x[:1], 0)
      >>> result = jnn.fit(state, data, num_steps=300, loss_fn="cross_entropy", eval_data=val,
      ...                  eval_every=100, plateau=plateau)

    Attributes:
      metric: the evaluation metric to watch ("loss", "accuracy", ...).
      mode: "min" (lower is better) or "max".
      factor: multiply the learning rate by this when the metric plateaus, in (0, 1).
      patience: evaluations without improvement before reducing.
      cooldown: evaluations ignored after a reduction.
      rtol, atol: an improvement must beat the best value by more than `atol + rtol * |best|`.
      min_scale: never scale the learning rate below this fraction of its schedule.
    """

    metric: str = "loss"
    mode: str = "min"
    factor: float = 0.5
    patience: int = 3
    cooldown: int = 0
    rtol: float = 1e-4
    atol: float = 0.0
    min_scale: float = 0.0

    def __post_init__(self):
        check_fields("Plateau", self, {
            "mode": (self.mode in PLATEAU_MODES, "'min' or 'max'"),
            "factor": (0 < self.factor < 1, "in (0, 1)"),
            "patience": (self.patience >= 1, ">= 1"),
            "cooldown": (self.cooldown >= 0, ">= 0"),
            "rtol": (self.rtol >= 0, ">= 0"),
            "atol": (self.atol >= 0, ">= 0"),
            "min_scale": (0 <= self.min_scale <= 1, "in [0, 1]"),
        })

    def transform(self) -> optax.GradientTransformation:
        """Scales every update by the current factor (1 until the first reduction)."""
        def init(params):
            del params
            return PlateauState(jnp.ones((), jnp.float32), jnp.full((), jnp.inf, jnp.float32),
                                jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

        def update(updates, state, params=None):
            del params
            return jax.tree.map(lambda u: (u * state.scale).astype(u.dtype), updates), state

        return optax.GradientTransformation(init, update)

    def advance(self, state: PlateauState, value: float) -> PlateauState:
        """The state after one evaluation whose metric is `value` (host arithmetic, no compile)."""
        value = value if self.mode == "min" else -value
        scale, best, bad, cooldown = (_host(x) for x in state)
        improved = value < best - self.atol - self.rtol * abs(best) if math.isfinite(best) else value < best
        best, bad = (value, 0) if improved else (best, bad + 1)
        if cooldown > 0:  # just reduced: ignore this evaluation's verdict
            bad, cooldown = 0, cooldown - 1
        elif bad >= self.patience:
            scale, bad, cooldown = max(scale * self.factor, self.min_scale), 0, self.cooldown
        return PlateauState(*(_like(v, x) for v, x in zip((scale, best, bad, cooldown), state)))

    def update(self, opt_state: PyTree, metrics: Any) -> PyTree:
        """`opt_state` with every `PlateauState` advanced by one evaluation's `metrics[self.metric]`.

        Raises:
          ValueError: the metric is not among `metrics`.
        """
        if self.metric not in metrics:
            raise ValueError(f"Plateau: metric {self.metric!r} is not among the evaluation metrics "
                             f"{sorted(metrics)}. Fix: Plateau(metric=<one of them>).")
        value = float(metrics[self.metric])
        return jax.tree.map(lambda x: self.advance(x, value) if isinstance(x, PlateauState) else x, opt_state,
                            is_leaf=lambda x: isinstance(x, PlateauState))


def _host(x) -> float | int:
    """A scalar's value; on several processes, from this process's replica."""
    x = x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x
    return np.asarray(x).item()


def _like(value, x):
    """`value` as an array placed like `x` (a global array stays global on several processes)."""
    value = np.asarray(value, x.dtype)
    return jax.device_put(value, x.sharding) if isinstance(x, jax.Array) else jnp.asarray(value)


def plateau_scale(opt_state: PyTree) -> jax.Array | None:
    """The current scale of the `Plateau` in `opt_state` (None without one)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PlateauState))
             if isinstance(x, PlateauState)]
    return found[0].scale if found else None
