"""OptimConfig -> one optax chain: clipping, optimizer, schedule, weight-decay mask, freezing,
gradient accumulation. Everything here composes optax; nothing re-implements it.

The optimizer is wrapped in `optax.inject_hyperparams`, so the current learning rate lives in the
optimizer state and the train step reports it as the "learning_rate" metric.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from jnn._names import check_fields, check_patterns, path_str, unknown
from jnn.plateau import PLATEAU_MODES, Plateau, PlateauState, plateau_scale  # noqa: F401 - jnn.optim.Plateau

PyTree = Any

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "lamb")
SCHEDULES = ("constant", "warmup_cosine", "cosine", "piecewise", "step", "exponential", "one_cycle", "linear",
             "plateau")


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
      lr_groups: discriminative learning rates: `((pattern, multiplier), ...)`; parameters whose
        "/"-joined path matches a pattern (the first that matches) train at the schedule's rate
        times its multiplier, e.g. `(("^conv", 0.1),)` for a pretrained backbone under a new head.
      l2: the classic L2 penalty `l2 / 2 * sum(w ** 2)` on the loss, for any optimizer: its
        gradient `l2 * w` joins the loss gradient before clipping and before the optimizer's
        moments (unlike AdamW's decoupled `weight_decay`). Masked like `weight_decay`
        (`decay_mask`). The reported loss is the data term.
      prune_sparsity, prune_end_step, prune_scope, prune_structured: gradual magnitude pruning
        (`jnn.pruning.Pruning`, Zhu & Gupta 2017) of the kernels to `prune_sparsity` (0: off) by
        `prune_end_step` (default: three quarters of `total_steps`), per layer or "global",
        single weights or whole output units (`prune_structured`); pruned weights stay exactly 0.
      plateau_metric, plateau_mode, plateau_factor, plateau_patience: for `schedule="plateau"`:
        the learning rate is multiplied by `plateau_factor` when the evaluation metric
        `plateau_metric` has not improved (`plateau_mode` "min" or "max") for `plateau_patience`
        evaluations (see `Plateau`; `jnn.fit` and `jnn train` drive it).
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
    lr_groups: tuple[tuple[str, float], ...] = ()
    l2: float = 0.0
    prune_sparsity: float = 0.0
    prune_end_step: int | None = None
    prune_scope: str = "layer"
    prune_structured: bool = False
    plateau_metric: str = "loss"
    plateau_mode: str = "min"
    plateau_factor: float = 0.5
    plateau_patience: int = 3

    def __post_init__(self):
        groups = self.lr_groups
        ok = all(isinstance(g, (tuple, list)) and len(g) == 2 and isinstance(g[0], str)
                 and isinstance(g[1], (int, float)) and g[1] > 0 for g in groups)
        if ok:  # JSON and --set give lists: keep the config hashable and comparable
            object.__setattr__(self, "lr_groups", tuple((str(p), float(m)) for p, m in groups))
        check_fields("OptimConfig", self, {
            "lr_groups": (ok, "((pattern, multiplier > 0), ...), e.g. (('^conv', 0.1),)"),
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
            "l2": (self.l2 >= 0, ">= 0"),
            "prune_sparsity": (0 <= self.prune_sparsity < 1, "in [0, 1)"),
            "prune_end_step": (self.prune_end_step is None or self.prune_end_step >= 1, ">= 1 or None"),
            "prune_scope": (self.prune_scope in ("layer", "global"), "'layer' or 'global'"),
            "plateau_mode": (self.plateau_mode in PLATEAU_MODES, "'min' or 'max'"),
            "plateau_factor": (0 < self.plateau_factor < 1, "in (0, 1)"),
            "plateau_patience": (self.plateau_patience >= 1, ">= 1"),
        })


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
        raise unknown("schedule", name, SCHEDULES)
    if name == "warmup_cosine":
        total = _need_total_steps(config)
        if total <= warmup:
            raise ValueError(
                f"schedule 'warmup_cosine' needs total_steps > warmup_steps; got total_steps={total}, "
                f"warmup_steps={warmup}. Fix: train for more steps, or lower optim.warmup_steps.")
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, config.end_learning_rate)
    if name == "one_cycle":
        return optax.cosine_onecycle_schedule(_need_total_steps(config), lr)
    if name in ("constant", "plateau"):  # plateau: a constant rate that `Plateau` scales
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


def freeze_labels(params: PyTree, patterns: tuple[str, ...]) -> PyTree:
    """"frozen" for parameters whose "/"-joined path matches any pattern, else "trainable".

    Raises:
      ValueError: a pattern that matches no parameter (listing the paths that exist).
    """
    compiled = check_patterns(params, patterns, "OptimConfig.frozen")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if any(c.search(path_str(path)) for c in compiled) else "trainable", params
    )


def group_labels(params: PyTree, groups: tuple[tuple[str, float], ...]) -> PyTree:
    """"group_<i>" for parameters whose path matches `groups[i]`'s pattern first, else "default"."""
    compiled = check_patterns(params, [p for p, _ in groups], "OptimConfig.lr_groups")

    def label(path, _):
        name = path_str(path)
        return next((f"group_{i}" for i, c in enumerate(compiled) if c.search(name)), "default")

    return jax.tree_util.tree_map_with_path(label, params)


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
    raise unknown("optimizer", name, OPTIMIZERS)


def make_optimizer(config: OptimConfig | None = None, **overrides: Any) -> optax.GradientTransformation:
    """Builds the optax chain for `config` (fields can be overridden by keyword).

    Example:
      >>> tx = jnn.make_optimizer(jnn.OptimConfig("adamw", 3e-4, schedule="warmup_cosine",
      ...                                         warmup_steps=100, total_steps=1000, clip_norm=1.0))

    Returns:
      `l2 -> clip -> optimizer(schedule; one per learning-rate group) -> plateau scale -> freeze ->
      pruning masks`, wrapped in `optax.MultiSteps` when `accumulate_steps > 1`.

    Raises:
      ValueError: for unknown optimizer or schedule names, listing the valid ones.
    """
    config = dataclasses.replace(config or OptimConfig(), **overrides)
    if config.name not in OPTIMIZERS:
        raise unknown("optimizer", config.name, OPTIMIZERS)
    if config.decay_mask not in ("auto", "all"):
        raise ValueError(f"decay_mask must be 'auto' or 'all'; got {config.decay_mask!r}.")
    if config.accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1; got {config.accumulate_steps}.")
    schedule = make_schedule(config)
    tx = optax.inject_hyperparams(_base_optimizer(config))(learning_rate=schedule)
    if config.lr_groups:  # one optimizer per group, at the schedule's rate times its multiplier
        groups = config.lr_groups
        scaled = lambda m: optax.inject_hyperparams(_base_optimizer(config))(  # noqa: E731
            learning_rate=lambda count: schedule(count) * m)
        tx = optax.multi_transform({"default": tx, **{f"group_{i}": scaled(m) for i, (_, m) in enumerate(groups)}},
                                   lambda params: group_labels(params, groups))
    if config.schedule == "plateau":
        tx = optax.chain(tx, plateau(config).transform())
    if config.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)
    if config.l2:  # the penalty's gradient is part of the loss gradient: before anything else
        tx = optax.chain(optax.add_decayed_weights(config.l2, None if config.decay_mask == "all" else decay_mask), tx)
    if config.frozen:
        patterns = tuple(config.frozen)
        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                                   lambda params: freeze_labels(params, patterns))
    if config.prune_sparsity:  # last in the chain: masks the final updates (counts optimizer updates)
        tx = optax.chain(tx, pruning(config).transform())
    if config.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accumulate_steps)
    return tx


def pruning(config: OptimConfig):
    """The `jnn.pruning.Pruning` of a config (None when `prune_sparsity` is 0).

    Raises:
      ValueError: pruning without `prune_end_step` or `total_steps` to schedule it over.
    """
    if not config.prune_sparsity:
        return None
    from jnn.pruning import Pruning  # noqa: PLC0415 - jnn.pruning imports this module

    end = config.prune_end_step
    if end is None:
        if not config.total_steps:
            raise ValueError("OptimConfig: prune_sparsity needs prune_end_step, or total_steps to place it at "
                             "three quarters of the run. Fix: set optim.prune_end_step.")
        end = max(1, (3 * config.total_steps) // 4)
    return Pruning(config.prune_sparsity, end_step=end, scope=config.prune_scope, structured=config.prune_structured)


def plateau(config: OptimConfig) -> Plateau | None:
    """The `Plateau` of a config with `schedule="plateau"` (None for other schedules)."""
    if config.schedule != "plateau":
        return None
    return Plateau(config.plateau_metric, config.plateau_mode, config.plateau_factor, config.plateau_patience)
