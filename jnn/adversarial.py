"""Adversarial examples and adversarial training: FGSM and PGD (L-inf and L2), as pure functions.

An attack is a small frozen value (`PGD`, or `fgsm(...)` for its one-step form); `attack(state,
batch, loss_fn, rng)` returns inputs that raise the loss, within `epsilon` of the originals in the
attack's norm and inside the input range. It runs under `jax.jit`, with the model in eval mode
(no batch-statistics update, no dropout), and its result is `stop_gradient`-ed: in adversarial
training the parameters' gradient is taken at the perturbed point (Danskin's theorem, as in Madry
et al. 2018), never through the attack.

  attack = jnn.adversarial.PGD(epsilon=0.1, steps=7)
  step = jax.jit(jnn.adversarial.make_adversarial_train_step("cross_entropy", attack, mix=0.5))
  robust = jnn.evaluate(state, val, jnn.adversarial.make_robust_eval_step("cross_entropy", attack))
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jnn._names import check_fields
from jnn.train.state import TrainState
from jnn.train.step import Step, make_eval_step, make_train_step, resolve_loss, step_rng

NORMS = ("linf", "l2")
_ATTACK_STREAM = 0x5EED  # the attack's random start draws from fold_in(step key, this)


@dataclasses.dataclass(frozen=True)
class PGD:
    """Projected gradient descent on the inputs (Madry et al. 2018); FGSM is its one-step form.

    Attributes:
      epsilon: the radius of the allowed perturbation, in the attack's norm (per example).
      steps: gradient steps (1 with `step_size=epsilon` and no random start: FGSM).
      step_size: each step's length; default `2.5 * epsilon / steps`.
      norm: "linf" (steps along the gradient's sign) or "l2" (along the normalised gradient).
      random_start: start from a uniformly random point of the ball, not the input itself.
      clip: the valid input range `(low, high)`, kept after every step; None for no range.
    """

    epsilon: float
    steps: int = 10
    step_size: float | None = None
    norm: str = "linf"
    random_start: bool = True
    clip: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self):
        check_fields("PGD", self, {
            "epsilon": (self.epsilon > 0, "> 0"),
            "steps": (isinstance(self.steps, int) and self.steps >= 1, "an integer >= 1"),
            "step_size": (self.step_size is None or self.step_size > 0, "> 0 or None"),
            "norm": (self.norm in NORMS, f"one of {list(NORMS)}"),
            "clip": (self.clip is None or (len(self.clip) == 2 and self.clip[0] < self.clip[1]),
                     "(low, high) with low < high, or None"),
        })

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.epsilon / self.steps

    def __call__(self, state: TrainState, batch: dict, loss_fn: Any, rng: jax.Array) -> jax.Array:
        """Adversarial inputs for `batch` (same shape and dtype as `batch["inputs"]`), gradient-stopped.

        Args:
          state: the model to attack (run in eval mode).
          batch: {"inputs": array, "labels": ...}; other entries reach a loss that reads the batch.
          loss_fn: the loss to raise: a `jnn.losses` name or `loss(outputs, labels)`.
          rng: the key for the random start.
        """
        loss = resolve_loss(loss_fn)
        x = batch["inputs"]
        if not hasattr(x, "shape"):
            raise ValueError(f"PGD: expected the batch's inputs to be one array (images, features), got "
                             f"{type(x).__name__}. Fix: attack models whose inputs are a single array.")
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"PGD: the inputs have dtype {x.dtype}; expected floating-point inputs (token ids "
                             f"cannot be perturbed). Fix: attack a model of continuous inputs.")
        axes = tuple(range(1, x.ndim))
        eps = jnp.asarray(self.epsilon, x.dtype)

        def total_loss(inputs):  # a sum: every example's gradient at full size, not divided by B
            outputs, _ = state.model.apply(state.params, state.model_state, inputs, train=False, rng=rng,
                                           axis_name=None)
            return jnp.sum(loss(outputs, batch["labels"], batch))

        def project(delta):
            if self.norm == "linf":
                delta = jnp.clip(delta, -eps, eps)
            else:
                norms = jnp.sqrt(jnp.sum(delta ** 2, axis=axes, keepdims=True))
                delta = delta * jnp.minimum(1.0, eps / jnp.maximum(norms, 1e-12))
            if self.clip is not None:
                delta = jnp.clip(x + delta, self.clip[0], self.clip[1]) - x
            return delta

        def step(_, delta):
            grad = jax.grad(total_loss)(x + delta)
            if self.norm == "linf":
                direction = jnp.sign(grad)
            else:
                direction = grad / jnp.maximum(jnp.sqrt(jnp.sum(grad ** 2, axis=axes, keepdims=True)), 1e-12)
            return project(delta + self.alpha * direction)

        if self.random_start:
            key = jax.random.fold_in(rng, _ATTACK_STREAM)
            if self.norm == "linf":
                delta = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
            else:  # uniform in the ball: a Gaussian direction, radius eps * u^(1/d)
                kd, kr = jax.random.split(key)
                direction = jax.random.normal(kd, x.shape, x.dtype)
                direction /= jnp.sqrt(jnp.sum(direction ** 2, axis=axes, keepdims=True))
                dims = x[0].size
                radius = eps * jax.random.uniform(kr, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype) ** (1.0 / dims)
                delta = direction * radius
            delta = project(delta)
        else:
            delta = jnp.zeros_like(x)
        delta = lax.fori_loop(0, self.steps, step, delta)
        return lax.stop_gradient(x + delta)


def fgsm(epsilon: float, clip: tuple[float, float] | None = (0.0, 1.0)) -> PGD:
    """The fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size `epsilon`."""
    return PGD(epsilon, steps=1, step_size=epsilon, norm="linf", random_start=False, clip=clip)


def _attacked(batch: dict, adversarial: jax.Array, mix: float) -> dict:
    """`batch` with the first `round(mix * B)` examples replaced by their adversarial versions."""
    x = batch["inputs"]
    n = round(mix * x.shape[0])
    if n == x.shape[0]:
        return {**batch, "inputs": adversarial}
    keep = (jnp.arange(x.shape[0]) < n).reshape((-1,) + (1,) * (x.ndim - 1))
    return {**batch, "inputs": jnp.where(keep, adversarial, x)}


def make_adversarial_train_step(loss_fn: Any, attack: PGD, *, mix: float = 1.0, **step_kwargs: Any) -> Step:
    """`make_train_step(loss_fn, **step_kwargs)` trained on adversarial examples of every batch.

    Each step attacks the current model (eval mode, the step's key), replaces the first
    `round(mix * B)` examples of the batch by their adversarial versions, and takes the ordinary
    step on that batch: `mix=1` is Madry et al.'s adversarial training, `mix=0.5` Goodfellow et
    al.'s half-clean objective, `mix=0` the plain step (at the attack's cost). Metrics are those of
    the step, on the mixed batch.

    Raises:
      ValueError: `mix` outside [0, 1], or bad step arguments.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"make_adversarial_train_step: mix={mix}; expected a fraction in [0, 1] of each "
                         f"batch to replace by adversarial examples.")
    inner = make_train_step(loss_fn, **step_kwargs)

    def adversarial_train_step(state: TrainState, batch: dict):
        if mix == 0.0:
            return inner.fn(state, batch)
        adversarial = attack(state, batch, loss_fn, step_rng(state, inner.axis_name))
        return inner.fn(state, _attacked(batch, adversarial, mix))

    return Step(adversarial_train_step, "train", inner.axis_name, inner.on_nonfinite)


def make_robust_eval_step(loss_fn: Any, attack: PGD, **eval_kwargs: Any) -> Step:
    """`make_eval_step(loss_fn)` on adversarial versions of every batch: robust accuracy and loss.

    Use it with `jnn.evaluate(state, data, jax.jit(step))`. The attack's random start uses the
    state's key, so an evaluation is reproducible.
    """
    inner = make_eval_step(loss_fn, **eval_kwargs)

    def robust_eval_step(state: TrainState, batch: dict):
        adversarial = attack(state, batch, loss_fn, step_rng(state, inner.axis_name))
        return inner.fn(state, {**batch, "inputs": adversarial})

    return Step(robust_eval_step, "eval", inner.axis_name)


__all__ = ["NORMS", "PGD", "fgsm", "make_adversarial_train_step", "make_robust_eval_step"]
