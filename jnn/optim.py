"""OptimConfig -> one optax chain: clipping, optimizer, schedule, weight-decay mask, freezing,
gradient accumulation. Everything here composes optax; nothing re-implements it.

The optimizer is wrapped in `optax.inject_hyperparams`, so the current learning rate lives in the
optimizer state and the train step reports it as the "learning_rate" metric.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Callable

import jax
import optax

PyTree = Any

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "lamb")
SCHEDULES = ("constant", "warmup_cosine", "cosine", "piecewise", "step", "exponential", "one_cycle", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """What `make_optimizer` builds.

    Attributes:
      name: one of `OPTIMIZERS`.
      learning_rate: peak learning rate.
      schedule: one of `SCHEDULES`.
      total_steps: length of the schedule (needed by cosine, warmup_cosine, one_cycle, linear).
      warmup_steps: linear warm-up steps (warmup_cosine; also prepended to other schedules).
      end_learning_rate: final value for cosine/linear/warmup_cosine decays.
      boundaries: step boundaries for "piecewise"/"step"; the rate is multiplied by `decay_rate`
        at each boundary.
      decay_rate: multiplier for "piecewise"/"step"/"exponential".
      decay_steps: for "exponential", the rate is multiplied by `decay_rate` every `decay_steps`.
      momentum: SGD momentum (0 for plain SGD), RMSProp momentum.
      nesterov: Nesterov momentum for SGD.
      b1, b2, eps: Adam-family moments and epsilon.
      weight_decay: decoupled (AdamW, LAMB) or L2-added-to-gradient (others) weight decay.
      decay_mask: "auto" decays only params with ndim > 1 (kernels, not biases or norm scales);
        "all" decays everything.
      clip_norm: clip gradients to this global norm first (None: no clipping).
      accumulate_steps: apply one update every k micro-batches with their mean gradient
        (`optax.MultiSteps`).
      frozen: regular expressions on "/"-joined parameter paths whose parameters are not updated
        (transfer learning), e.g. `("^backbone/",)`.
    """

    name: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    total_steps: int | None = None
    warmup_steps: int = 0
    end_learning_rate: float = 0.0
    boundaries: tuple[int, ...] = ()
    decay_rate: float = 0.1
    decay_steps: int = 1000
    momentum: float = 0.9
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_mask: str = "auto"
    clip_norm: float | None = None
    accumulate_steps: int = 1
    frozen: tuple[str, ...] = ()

    def __post_init__(self):
        check_fields("OptimConfig", self, {
            "learning_rate": (self.learning_rate > 0, "> 0"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "total_steps": (self.total_steps is None or self.total_steps > 0, "> 0 or None"),
            "end_learning_rate": (self.end_learning_rate >= 0, ">= 0"),
            "decay_rate": (self.decay_rate > 0, "> 0"),
            "decay_steps": (self.decay_steps > 0, "> 0"),
            "momentum": (0 <= self.momentum < 1, "in [0, 1)"),
            "b1": (0 <= self.b1 < 1, "in [0, 1)"),
            "b2": (0 <= self.b2 < 1, "in [0, 1)"),
            "eps": (self.eps >= 0, ">= 0"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "decay_mask": (self.decay_mask in ("auto", "all"), "'auto' or 'all'"),
            "clip_norm": (self.clip_norm is None or self.clip_norm > 0, "> 0 or None"),
            "accumulate_steps": (self.accumulate_steps >= 1, ">= 1"),
        })


def check_fields(where: str, config: Any, rules: dict[str, tuple[bool, str]]) -> None:
    """Raises a `ValueError` naming the first field whose rule fails: `{field: (ok, expected)}`.

    Every config checks its fields when it is built, before anything runs.
    """
    for field, (ok, expected) in rules.items():
        if not ok:
            raise ValueError(f"{where}: {field}={getattr(config, field)!r}; expected {field} {expected}. "
                             f"Fix: choose {field} {expected} (in a config file or with --set).")


def _unknown(kind: str, name: str, valid) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=2)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}; expected one of {list(valid)}.{hint}")


def _need_total_steps(config: OptimConfig) -> int:
    if not config.total_steps or config.total_steps <= 0:
        raise ValueError(
            f"schedule {config.schedule!r} needs total_steps > 0; got total_steps={config.total_steps}. "
            f"Fix: set OptimConfig(total_steps=<number of training steps>)."
        )
    return config.total_steps


def make_schedule(config: OptimConfig) -> optax.Schedule:
    """The learning-rate schedule of `config` as an optax schedule (step -> rate).

    Raises:
      ValueError: for an unknown schedule name (listing the valid ones) or missing total_steps.
    """
    lr, warmup = config.learning_rate, config.warmup_steps
    name = config.schedule
    if name not in SCHEDULES:
        raise _unknown("schedule", name, SCHEDULES)
    if name == "warmup_cosine":
        total = _need_total_steps(config)
        if total <= warmup:
            raise ValueError(
                f"schedule 'warmup_cosine' needs total_steps > warmup_steps; got total_steps={total}, "
                f"warmup_steps={warmup}. Fix: train for more steps, or lower optim.warmup_steps.")
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, config.end_learning_rate)
    if name == "one_cycle":
        return optax.cosine_onecycle_schedule(_need_total_steps(config), lr)
    if name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "cosine":
        total = _need_total_steps(config)
        main = optax.cosine_decay_schedule(lr, max(total - warmup, 1), alpha=config.end_learning_rate / lr if lr else 0.0)
    elif name == "linear":
        total = _need_total_steps(config)
        main = optax.linear_schedule(lr, config.end_learning_rate, max(total - warmup, 1))
    elif name in ("piecewise", "step"):
        main = optax.piecewise_constant_schedule(lr, {int(b) - warmup: config.decay_rate for b in config.boundaries})
    else:  # exponential
        main = optax.exponential_decay(lr, config.decay_steps, config.decay_rate)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params: PyTree) -> PyTree:
    """True for parameters that get weight decay: those with ndim > 1 (not biases or norm scales)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def freeze_labels(params: PyTree, patterns: tuple[str, ...]) -> PyTree:
    """"frozen" for parameters whose "/"-joined path matches any pattern, else "trainable"."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if any(c.search(_path(path)) for c in compiled) else "trainable", params
    )


def _base_optimizer(config: OptimConfig) -> Callable[..., optax.GradientTransformation]:
    """An optax optimizer factory taking `learning_rate`, with the config's other settings bound."""
    mask = None if config.decay_mask == "all" else decay_mask
    wd = config.weight_decay
    name = config.name

    def with_l2(opt):  # coupled L2 decay: added to the gradient before the optimizer, as torch does
        return (lambda learning_rate: optax.chain(optax.add_decayed_weights(wd, mask), opt(learning_rate))) if wd else opt

    if name == "sgd":
        return with_l2(lambda learning_rate: optax.sgd(
            learning_rate, momentum=config.momentum or None, nesterov=config.nesterov))
    if name == "adam":
        return with_l2(lambda learning_rate: optax.adam(learning_rate, config.b1, config.b2, config.eps))
    if name == "adamw":
        return lambda learning_rate: optax.adamw(learning_rate, config.b1, config.b2, config.eps,
                                                 weight_decay=wd, mask=mask)
    if name == "rmsprop":
        return with_l2(lambda learning_rate: optax.rmsprop(
            learning_rate, eps=config.eps, momentum=config.momentum or None, nesterov=config.nesterov))
    if name == "adagrad":
        return with_l2(lambda learning_rate: optax.adagrad(learning_rate, eps=config.eps))
    if name == "lamb":
        return lambda learning_rate: optax.lamb(learning_rate, config.b1, config.b2, config.eps,
                                                weight_decay=wd, mask=mask)
    raise _unknown("optimizer", name, OPTIMIZERS)


def make_optimizer(config: OptimConfig | None = None, **overrides: Any) -> optax.GradientTransformation:
    """Builds the optax chain for `config` (fields can be overridden by keyword).

    Example:
      >>> tx = jnn.make_optimizer(jnn.OptimConfig("adamw", 3e-4, schedule="warmup_cosine",
      ...                                         warmup_steps=100, total_steps=1000, clip_norm=1.0))

    Returns:
      `clip -> optimizer(schedule) -> freeze`, wrapped in `optax.MultiSteps` when
      `accumulate_steps > 1`.

    Raises:
      ValueError: for unknown optimizer or schedule names, listing the valid ones.
    """
    config = dataclasses.replace(config or OptimConfig(), **overrides)
    if config.name not in OPTIMIZERS:
        raise _unknown("optimizer", config.name, OPTIMIZERS)
    if config.decay_mask not in ("auto", "all"):
        raise ValueError(f"decay_mask must be 'auto' or 'all'; got {config.decay_mask!r}.")
    if config.accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1; got {config.accumulate_steps}.")
    schedule = make_schedule(config)
    tx = optax.inject_hyperparams(_base_optimizer(config))(learning_rate=schedule)
    if config.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)
    if config.frozen:
        patterns = tuple(config.frozen)
        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                                   lambda params: freeze_labels(params, patterns))
    if config.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accumulate_steps)
    return tx
