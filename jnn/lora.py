"""LoRA: low-rank adapters on any flax model's kernels, without editing the model.

Hu et al. 2021: a frozen weight `W` is used as `W + (alpha / rank) * A @ B`, with `A` of shape
(fan_in, rank) drawn at random and `B` of shape (rank, fan_out) starting at zero (so the adapted
model starts exactly as the pretrained one). jnn applies it to the parameters, not the module: a
kernel of any rank is seen as the matrix (product of all axes but the last, last axis), which is
a Dense kernel, a convolution's (kh * kw * in, out) and an attention projection's
(embed [* heads], out); the model runs on the merged weights. Only the adapters train: the base
weights enter the step under `stop_gradient` (their gradient is not even computed) and the
optimizer state holds the adapters' moments only. In short::

  state = jnn.create_train_state(model, optax.adam(1e-3), x[:1], 0)      # or load_pretrained(...)
  lora = jnn.lora.LoRA(rank=4, alpha=8, targets=("Dense_\\\\d+/kernel$",))
  state = jnn.lora.apply(state, lora, optax.adam(1e-3))
  ...train...
  params = jnn.lora.merge(state)          # plain params for model.apply({"params": params}, x)
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jnn._names import check_patterns, path_str
from jnn._names import check_fields
from jnn.train.state import TrainState
from jnn.transfer import flatten

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Which kernels get adapters, and their size.

    Attributes:
      rank: the adapters' rank r (at most the kernel's smaller matrix side).
      alpha: the scale numerator: the update is `(alpha / rank) * A @ B`.
      targets: regular expressions on "/"-joined parameter paths; default every kernel with
        ndim >= 2 (Dense, DenseGeneral, attention projections, convolutions).
      train_base: patterns of base parameters that train in full beside the adapters (e.g. a
        new head, `("^head/",)`); every other base parameter is frozen.
    """

    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ()
    train_base: tuple[str, ...] = ()

    def __post_init__(self):
        check_fields("LoRA", self, {"rank": (isinstance(self.rank, int) and self.rank >= 1, "an integer >= 1"),
                                    "alpha": (self.alpha > 0, "> 0")})

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, params: PyTree) -> PyTree:
        """The model's parameters: the frozen base with every adapter merged in."""
        return _merged(params["base"], params["lora"], self.scale, frozen=self._frozen_base(params["base"]))

    def _frozen_base(self, base: PyTree) -> PyTree:
        """Per base leaf: frozen (True) unless it matches `train_base`."""
        patterns = [re.compile(p) for p in self.train_base]
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(p.search(path_str(path)) for p in patterns), base)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _targets(params: PyTree, lora: LoRA) -> dict[str, Any]:
    flat = flatten(params)
    if not lora.targets:
        return {p: x for p, x in flat.items() if x.ndim >= 2}
    patterns = [re.compile(t) for t in lora.targets]
    for t, pattern in zip(lora.targets, patterns):
        if not any(pattern.search(p) for p in flat):
            raise ValueError(f"LoRA: target {t!r} matches no parameter; the parameter paths are "
                             f"{sorted(flat)}. Fix: a regular expression on one of them, e.g. 'Dense_0/kernel$'.")
    chosen = {p: x for p, x in flat.items() if any(pt.search(p) for pt in patterns)}
    flat_ones = [p for p, x in chosen.items() if x.ndim < 2]
    if flat_ones:
        raise ValueError(f"LoRA: targets {list(lora.targets)} select {flat_ones}, which are not kernels (ndim < 2); "
                         f"expected matrices or convolution kernels. Fix: end the patterns with 'kernel$'.")
    return chosen


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return math.prod(shape[:-1]), shape[-1]


def _merged(base: PyTree, adapters: PyTree, scale: float, *, frozen: Any) -> PyTree:
    """Base weights with the adapters added; `frozen` (a bool, or a tree of them like `base`) says
    which base weights enter under `stop_gradient`."""
    flat_adapters = flatten(adapters)
    frozen = jax.tree.map(lambda _: frozen, base) if isinstance(frozen, bool) else frozen

    def merge(path, w, stop):
        name = path_str(path)
        w = jax.lax.stop_gradient(w) if stop else w
        if name + "/a" not in flat_adapters:
            return w
        a, b = flat_adapters[name + "/a"], flat_adapters[name + "/b"]
        delta = (a @ b).reshape(w.shape) * scale
        return (w + delta.astype(w.dtype)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(merge, base, frozen)


def init_adapters(params: PyTree, lora: LoRA, rng: Any = 0) -> PyTree:
    """The adapters for `params`: per target kernel path, {"a": (fan_in, r) ~ N(0, 1/fan_in), "b": zeros}.

    Raises:
      ValueError: a target pattern that matches nothing (listing the paths), a rank larger than a
        kernel's smaller side.
    """
    targets = _targets(params, lora)
    if not targets:
        raise ValueError(f"LoRA: the model has no kernel with ndim >= 2; parameters: {sorted(flatten(params))}.")
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    adapters: dict = {}
    for i, (path, w) in enumerate(sorted(targets.items())):
        fan_in, fan_out = _matrix_shape(w.shape)
        if lora.rank > min(fan_in, fan_out):
            raise ValueError(f"LoRA: rank={lora.rank} is larger than the layer {path} of shape {tuple(w.shape)} "
                             f"(as a matrix {fan_in} x {fan_out}); expected rank <= {min(fan_in, fan_out)}. "
                             f"Fix: a smaller rank, or targets that leave this layer out.")
        a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, lora.rank), jnp.float32) / math.sqrt(fan_in)
        _set(adapters, tuple(path.split("/")), {"a": a.astype(w.dtype), "b": jnp.zeros((lora.rank, fan_out), w.dtype)})
    return adapters


def apply(state: TrainState, lora: LoRA, tx: optax.GradientTransformation, rng: Any = 0) -> TrainState:
    """`state` fine-tuned through adapters: params become {"base": frozen, "lora": adapters}, only the
    adapters are updated by `tx` (its state covers them alone), and the model runs on the merged
    weights (`state.variables` too). Train it with any jnn step, `fit` or `jnn.parallel`.
    """
    if getattr(state.model, "reparam", None) is not None:
        raise ValueError("LoRA.apply: the state already has adapters. Fix: merge them first "
                         "(jnn.lora.merge) and build a new state, or keep training these.")
    from jnn.pruning import masks  # noqa: PLC0415 - jnn.pruning imports jnn.optim, as this module does

    if masks(state.opt_state) is not None or masks(tx.init(state.params)) is not None:
        raise ValueError("LoRA.apply: the optimizer prunes (a jnn.pruning transform is in its chain); with "
                         "adapters it would prune the adapters, not the model's weights. Fix: prune the model "
                         "first and add adapters to the pruned state with an optimizer that does not prune, "
                         "or merge the adapters (jnn.lora.merge) and prune the merged model.")
    adapters = init_adapters(state.params, lora, rng)
    params = {"base": state.params, "lora": adapters}
    if lora.train_base:
        check_patterns(state.params, lora.train_base, "LoRA.train_base")
    frozen = lora._frozen_base(state.params)
    labels = {"base": jax.tree.map(lambda f: "frozen" if f else "train", frozen),
              "lora": jax.tree.map(lambda _: "train", adapters)}
    chain = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    model = dataclasses.replace(state.model, reparam=lora)
    return state.replace(params=params, opt_state=chain.init(params), tx=chain, model=model)


def merge(state: TrainState) -> PyTree:
    """The plain parameters of a LoRA state, adapters folded into the base weights (for inference:
    `model.apply({"params": merge(state), **state.model_state}, x)`)."""
    lora = getattr(state.model, "reparam", None)
    if not isinstance(lora, LoRA):
        raise ValueError("lora.merge: the state has no LoRA adapters (built with jnn.lora.apply).")
    return _merged(state.params["base"], state.params["lora"], lora.scale, frozen=False)


def trainable_count(state: TrainState) -> int:
    """Number of parameters the optimizer updates: for a LoRA state, the adapters' (and `train_base`'s)."""
    lora = getattr(state.model, "reparam", None)
    if not isinstance(lora, LoRA):
        return sum(int(x.size) for x in jax.tree.leaves(state.params))
    base = jax.tree.leaves(jax.tree.map(lambda x, f: 0 if f else int(x.size), state.params["base"],
                                        lora._frozen_base(state.params["base"])))
    return sum(base) + sum(int(x.size) for x in jax.tree.leaves(state.params["lora"]))


__all__ = ["LoRA", "apply", "init_adapters", "merge", "trainable_count"]
