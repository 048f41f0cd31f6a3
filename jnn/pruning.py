"""Magnitude pruning with Zhu & Gupta's gradual schedule ("To prune, or not to prune", 2017).

The sparsity of the selected parameters rises from 0 at `begin_step` to `sparsity` at `end_step`
along `s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0)) ** power)`; every `frequency` optimizer steps
the weights of smallest magnitude are masked, and the masked weights are exactly 0.0 after every
step from then on. It is one optax transformation, put last in the optimizer chain, so the jitted
train step, checkpoints and resuming work unchanged:

  >>> pruning = jnn.pruning.Pruning(0.8, end_step=200, targets=("kernel$",))
  >>> tx = optax.chain(optax.adam(1e-3), pruning.transform())
  >>> state = jnn.create_train_state(model, tx, x[:1], 0)
  >>> result = jnn.fit(state, data, num_steps=300, loss_fn="cross_entropy")
  >>> round(float(jnn.pruning.sparsity_report(result.state.params, pruning)["total"]), 2)
  0.8

The masks live in the optimizer state (`PruningState`), as arrays shaped like the parameters, so
`jnn.Checkpointer` saves and restores them with the rest of the state.
"""
from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jnn._names import check_patterns, path_str
from jnn._names import check_fields

PyTree = Any

SCOPES = ("layer", "global")

__all__ = ["SCOPES", "Pruning", "PruningState", "masks", "sparsity_report"]


class PruningState(NamedTuple):
    """The optimizer state of `Pruning.transform()`.

    Attributes:
      count: int32 scalar: optimizer updates applied so far.
      masks: a pytree like the parameters: for each pruned array a bool array of its shape (True =
        kept, False = pruned, exactly 0.0); for every other parameter a scalar True placeholder.
    """

    count: jax.Array
    masks: PyTree


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Pruning:
    """Gradual magnitude pruning (Zhu & Gupta 2017) as an optax transformation.

    Steps count optimizer updates since the transformation's `init`: with an optimizer built for a
    new `TrainState` they are its `state.step`. The masks are recomputed by the update that takes
    the parameters to step `t` for `t = begin_step, begin_step + frequency, ...` up to `end_step`,
    and at `end_step` itself, at sparsity `schedule(t)`; after `end_step` they stay fixed. A
    recomputation ranks the parameters as they are after that update; weights pruned earlier rank
    first, so the masks only ever grow and a pruned weight is never revived.

    Example:
      >>> pruning = jnn.pruning.Pruning(0.5, end_step=300, frequency=10)
      >>> tx = optax.chain(optax.adam(1e-3), pruning.transform())  # last in the chain

    Attributes:
      sparsity: the final fraction of pruned weights, in [0, 1).
      end_step: the step at which `sparsity` is reached (> begin_step).
      begin_step: the step at which pruning starts (sparsity 0 there), >= 0.
      frequency: recompute the masks every this many optimizer steps, >= 1.
      power: the exponent of Zhu & Gupta's polynomial schedule (3: prune fast early, slowly at the
        end), > 0.
      scope: "layer": every selected array is pruned to `sparsity` on its own; "global": one
        magnitude threshold across all selected arrays (layers with many small weights lose more).
      structured: prune whole output units instead of single weights: the slices along a kernel's
        last axis (a Dense layer's columns, a convolution's output channels), ranked by the L2
        norm of each slice. With scope "layer", `round(sparsity * units)` units of each array are
        pruned. With scope "global", the units of all selected arrays are ranked together by the
        root-mean-square of their slice (the L2 norm over sqrt(slice size), so units of different
        fan-in compare) and the smallest are pruned while the pruned weights stay within
        `round(sparsity * weights)`. Leave the output layer out of `targets`: pruning its units
        removes classes.
      targets: regular expressions matched (`re.search`) against "/"-joined parameter paths such as
        "dense_0/kernel"; the parameters matching any are pruned. Empty: every parameter with
        ndim > 1 (kernels; not biases or norm scales). Each must match some parameter.
    """

    sparsity: float
    _: dataclasses.KW_ONLY
    end_step: int
    begin_step: int = 0
    frequency: int = 10
    power: float = 3.0
    scope: str = "layer"
    structured: bool = False
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.targets, list):  # e.g. from a JSON config
            object.__setattr__(self, "targets", tuple(self.targets))
        targets_ok = isinstance(self.targets, tuple) and all(isinstance(t, str) for t in self.targets)
        check_fields("Pruning", self, {
            "sparsity": (_is_number(self.sparsity) and 0 <= self.sparsity < 1, "a number in [0, 1)"),
            "begin_step": (_is_int(self.begin_step) and self.begin_step >= 0, "an int >= 0"),
            "end_step": (_is_int(self.end_step) and _is_int(self.begin_step) and self.end_step > self.begin_step,
                         f"an int > begin_step={self.begin_step!r}"),
            "frequency": (_is_int(self.frequency) and self.frequency >= 1, "an int >= 1"),
            "power": (_is_number(self.power) and self.power > 0, "a number > 0"),
            "scope": (self.scope in SCOPES, "'layer' or 'global'"),
            "structured": (isinstance(self.structured, bool), "True or False"),
            "targets": (targets_ok, "a tuple of regular expressions, e.g. ('kernel$',)"),
        })
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"Pruning: targets has {pattern!r}, which is not a regular expression "
                                 f"({err}); expected regular expressions on '/'-joined parameter paths, "
                                 f"e.g. ('kernel$',). Fix: correct or escape the pattern.") from None

    # ------------------------------------------------------------------ the schedule

    def schedule(self, step: Any) -> jax.Array:
        """The sparsity at `step`: `s_f * (1 - (1 - clip((step - begin) / (end - begin), 0, 1)) ** power)`.

        Zhu & Gupta's eq. 1 with initial sparsity 0: 0 up to `begin_step`, `sparsity` from
        `end_step` on. Jit-compatible (`step` may be traced); returns a float32 scalar.
        """
        progress = (jnp.asarray(step, jnp.float32) - self.begin_step) / (self.end_step - self.begin_step)
        progress = jnp.clip(progress, 0.0, 1.0)
        return jnp.float32(self.sparsity) * (1.0 - (1.0 - progress) ** jnp.float32(self.power))

    # ------------------------------------------------------------------ selection

    def selected(self, params: PyTree) -> PyTree:
        """A pytree like `params`: True for the parameters this pruning prunes.

        Raises:
          ValueError: a pattern of `targets` matches no parameter path (the message lists the
            paths), or nothing is selected.
        """
        leaves = jax.tree_util.tree_leaves_with_path(params)
        paths = [path_str(p) for p, _ in leaves]
        compiled = check_patterns(params, self.targets, "Pruning(targets=...)")

        def pick(path, x) -> bool:
            if self.targets:
                return any(c.search(path_str(path)) for c in compiled)
            return np.ndim(x) > 1

        chosen = jax.tree_util.tree_map_with_path(pick, params)
        if not any(jax.tree.leaves(chosen)):
            raise ValueError(
                f"Pruning: no parameter to prune: with no targets, every parameter with ndim > 1 is "
                f"pruned, and there is none among {[(p, tuple(np.shape(x))) for p, (_, x) in zip(paths, leaves)]}. "
                f"Fix: name the parameters with Pruning(targets=(<regular expression>, ...)).")
        return chosen

    # ------------------------------------------------------------------ the transformation

    def transform(self) -> optax.GradientTransformation:
        """The optax transformation to put last in the optimizer chain.

        Its state is a `PruningState`. Its update needs `params`; it returns updates after which
        every pruned weight is exactly 0.0 (`where(mask, updates, -params)`), and every
        `frequency` steps from `begin_step` to `end_step` it first recomputes the masks from the
        magnitudes of `params + updates` at sparsity `schedule(step)`. Exactly
        `round(sparsity * n)` weights are pruned per array (scope "layer") or over all selected
        arrays (scope "global"), ties broken by position.

        Raises:
          ValueError: (init) a target pattern matches no parameter; (update) `params` is None.
        """
        def init(params):
            chosen = self.selected(params)
            return PruningState(
                count=jnp.zeros((), jnp.int32),
                masks=jax.tree.map(lambda p, c: jnp.ones(jnp.shape(p) if c else (), bool), params, chosen))

        def update(updates, state, params=None):
            if params is None:
                raise ValueError(
                    "Pruning: the pruning transformation needs the parameters: its update was called "
                    "with params=None. Fix: call tx.update(grads, opt_state, params) (TrainState and "
                    "jnn's train step do), and put pruning.transform() in the chain itself, not inside "
                    "a wrapper that drops params.")
            chosen = self.selected(params)
            step = state.count + 1  # the step the parameters reach with this update
            new = jax.tree.map(lambda p, u: jnp.asarray(p + u).astype(jnp.result_type(p)), params, updates)
            due = ((step >= self.begin_step) & (step <= self.end_step)
                   & (((step - self.begin_step) % self.frequency == 0) | (step == self.end_step)))
            masks = jax.lax.cond(due, lambda: self._masks(new, state.masks, chosen, step),
                                 lambda: state.masks)
            updates = jax.tree.map(lambda u, m, p, c: jnp.where(m, u, -p) if c else u,
                                   updates, masks, params, chosen)
            return updates, PruningState(count=optax.safe_increment(state.count), masks=masks)

        return optax.GradientTransformation(init, update)

    def _masks(self, new: PyTree, old: PyTree, chosen: PyTree, step: jax.Array) -> PyTree:
        """The masks of the selected arrays of `new` at `schedule(step)` (static shapes only)."""
        sparsity = self.schedule(step)
        at_end = step >= self.end_step

        def count(n: int) -> jax.Array:  # how many of n to prune; exact (host rounding) at the end
            now = jnp.round(sparsity * n).astype(jnp.int32)
            return jnp.where(at_end, jnp.int32(round(self.sparsity * n)), jnp.minimum(now, n))

        flat_new, tree = jax.tree.flatten(new)
        flat_old, flat_chosen = tree.flatten_up_to(old), tree.flatten_up_to(chosen)
        idx = [i for i, c in enumerate(flat_chosen) if c]
        out = list(flat_old)
        if self.structured:
            scores, sizes = {}, {}
            for i in idx:
                x, m = flat_new[i], flat_old[i]
                units = x.shape[-1] if x.ndim else 1
                rows = jnp.reshape(jnp.where(m, x, 0).astype(jnp.float32), (-1, units))
                alive = jnp.any(jnp.reshape(m, (-1, units)), axis=0)
                norm = jnp.sqrt(jnp.sum(rows * rows, axis=0))
                if self.scope == "global":
                    norm = norm / np.sqrt(rows.shape[0])
                scores[i], sizes[i] = jnp.where(alive, norm, -1.0), rows.shape[0]
            if self.scope == "layer":
                keep = {i: _keep_ranked(scores[i], count(scores[i].shape[0])) for i in idx}
            else:
                keep = _split(_keep_cumulative(
                    jnp.concatenate([scores[i] for i in idx]),
                    np.concatenate([np.full(scores[i].shape[0], sizes[i]) for i in idx]),
                    count(sum(scores[i].shape[0] * sizes[i] for i in idx))), idx, scores)
            for i in idx:
                x = flat_new[i]
                out[i] = jnp.broadcast_to(keep[i], x.shape) if x.ndim else jnp.reshape(keep[i], ())
        else:
            scores = {i: jnp.where(flat_old[i], jnp.abs(flat_new[i]), -1.0).astype(jnp.float32).ravel()
                      for i in idx}
            if self.scope == "layer":
                keep = {i: _keep_ranked(scores[i], count(scores[i].shape[0])) for i in idx}
            else:
                keep = _split(_keep_ranked(jnp.concatenate([scores[i] for i in idx]),
                                           count(sum(scores[i].shape[0] for i in idx))), idx, scores)
            for i in idx:
                out[i] = jnp.reshape(keep[i], flat_new[i].shape)
        return jax.tree.unflatten(tree, out)


def _keep_ranked(scores: jax.Array, k: jax.Array) -> jax.Array:
    """False for the `k` smallest of the 1-d `scores` (ties: the earlier first), True for the rest."""
    n = scores.shape[0]
    order = jnp.argsort(scores, stable=True)
    return jnp.zeros(n, bool).at[order].set(jnp.arange(n) >= k)


def _keep_cumulative(scores: jax.Array, sizes: np.ndarray, k: jax.Array) -> jax.Array:
    """False for the smallest `scores` (units of `sizes` weights) while their weights total <= k."""
    order = jnp.argsort(scores, stable=True)
    total = jnp.cumsum(jnp.asarray(sizes, jnp.int32)[order])
    return jnp.zeros(scores.shape[0], bool).at[order].set(total > k)


def _split(flat: jax.Array, idx: list[int], parts: dict[int, jax.Array]) -> dict[int, jax.Array]:
    """`flat` cut back into pieces the lengths of `parts[i]`, in the order of `idx`."""
    cuts = np.cumsum([parts[i].shape[0] for i in idx])[:-1]
    return dict(zip(idx, jnp.split(flat, cuts)))


def masks(opt_state: PyTree) -> PyTree | None:
    """The masks of the `Pruning` transformation in `opt_state` (None without one)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruningState))
             if isinstance(x, PruningState)]
    return found[0].masks if found else None


def sparsity_report(params: PyTree, pruning: Pruning | None = None) -> dict[str, float]:
    """The fraction of exact zeros per selected array, over the selected arrays, and over all.

    Host-side (numpy): fetches the parameters.

    Args:
      params: the parameters (a `TrainState` is taken as its `params`).
      pruning: selects the arrays as it prunes them (its `targets`); None: every parameter with
        ndim > 1.

    Returns:
      `{path: fraction, ..., "total": fraction over the selected arrays, "all": over every
      parameter}`, e.g. `{"dense_0/kernel": 0.5, "head/kernel": 0.5, "total": 0.5, "all": 0.49}`.

    Raises:
      ValueError: a target pattern of `pruning` matches no parameter.
    """
    params = getattr(params, "params", params)
    chosen = (pruning or Pruning(0.0, end_step=1)).selected(params)
    report, zeros, size, all_zeros, all_size = {}, 0, 0, 0, 0
    for (path, x), c in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(params)), jax.tree.leaves(chosen)):
        x = np.asarray(x)
        z = int(np.count_nonzero(x == 0))
        all_zeros, all_size = all_zeros + z, all_size + x.size
        if c:
            report[path_str(path)] = z / max(x.size, 1)
            zeros, size = zeros + z, size + x.size
    report["total"] = zeros / max(size, 1)
    report["all"] = all_zeros / max(all_size, 1)
    return report
