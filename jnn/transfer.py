"""Transfer learning: pretrained weights into a new model, matched by parameter path, with a report.

`load_pretrained(state, source)` takes the weights from a jnn run directory or checkpoint folder
(orbax), a flax msgpack file (`flax.serialization.to_bytes`), a safetensors file, an `.npz`, or a
params pytree, and puts every array whose "/"-joined path and shape match the new model into its
state. The report says what was loaded, what keeps its fresh initialisation (e.g. a new head) and
what the source had that the model does not; a shape that differs (a head for 10 classes into one
for 5) is named with both shapes, and is an error unless `skip_mismatched=True` keeps the fresh
values for it.

  state = jnn.create_train_state(new_model, tx, x[:1], 0)
  state, report = jnn.transfer.load_pretrained(state, "runs/pretrain", skip_mismatched=True)
  print(report)
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jnn._names import path_str
from jnn.train.state import TrainState

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TransferReport:
    """What `load_pretrained` did, path by path ("params/..." and "model_state/...")."""

    loaded: tuple[str, ...]
    initialised: tuple[str, ...]  # in the model, not in the source: fresh values kept
    ignored: tuple[str, ...]  # in the source, not in the model
    mismatched: tuple[str, ...]  # "path: source (a, b) vs model (c, d)"

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} array(s), initialised {len(self.initialised)} new, "
                 f"ignored {len(self.ignored)} from the source, {len(self.mismatched)} shape mismatch(es)"]
        for name, paths in (("new (initialised)", self.initialised), ("ignored", self.ignored),
                            ("shape mismatch (kept the new initialisation)", self.mismatched)):
            lines += [f"  {name}: {p}" for p in paths]
        return "\n".join(lines)


def flatten(tree: PyTree, prefix: str = "") -> dict[str, Any]:
    """`{"a/b/kernel": array}` of a nested tree (the paths jnn's freeze and LoRA patterns match)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[prefix + path_str(path)] = leaf
    return out


def _unflatten_like(template: PyTree, flat: Mapping[str, Any], prefix: str) -> PyTree:
    paths = jax.tree_util.tree_leaves_with_path(template)
    leaves = [flat[prefix + path_str(p)] for p, _ in paths]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def read_weights(source: Any) -> dict[str, np.ndarray]:
    """The source's arrays by path: "params/..." (and "model_state/..." from a jnn checkpoint).

    Args:
      source: a jnn run directory or its `checkpoints/` folder (the newest step), one step folder,
        a `.msgpack` / `.safetensors` / `.npz` file, or a params pytree (nested dicts of arrays).
        Files and pytrees hold parameters only: their paths are prefixed with "params/" unless
        they already start with it.

    Raises:
      ValueError: a source that is none of these, or a file that cannot be read.
    """
    if isinstance(source, Mapping):
        return _as_params(flatten(source))
    path = os.fspath(source)
    if os.path.isdir(path):
        return _read_checkpoint(path)
    if not os.path.isfile(path):
        raise ValueError(f"load_pretrained: {path!r} does not exist; expected a jnn run directory, a "
                         f"checkpoint folder, or a .msgpack / .safetensors / .npz file.")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return _as_params({k.replace(".", "/"): v for k, v in load_file(path).items()})
    if path.endswith(".npz"):
        with np.load(path) as f:
            return _as_params({k.replace(".", "/"): f[k] for k in f.files})
    if path.endswith(".msgpack"):
        from flax import serialization

        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
        return _as_params(flatten(tree))
    raise ValueError(f"load_pretrained: cannot read {path!r}; expected a .msgpack, .safetensors or .npz file "
                     f"(or a jnn run directory).")


def _as_params(flat: dict[str, Any]) -> dict[str, np.ndarray]:
    return {(k if k.startswith(("params/", "model_state/")) else "params/" + k): np.asarray(v)
            for k, v in flat.items()}


def _read_checkpoint(path: str) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    for candidate in (path, os.path.join(path, "checkpoints")):
        steps = sorted((int(d) for d in os.listdir(candidate) if d.isdigit()), reverse=True) \
            if os.path.isdir(candidate) else []
        if steps:
            path = os.path.join(candidate, str(steps[0]))
            break
    state_dir = os.path.join(path, "state")
    if not os.path.isdir(state_dir):
        raise ValueError(f"load_pretrained: {path!r} holds no jnn checkpoint; expected <run>/checkpoints/<step>/state "
                         f"written by `jnn train` or jnn.Checkpointer.")
    state_dir = os.path.abspath(state_dir)
    checkpointer = ocp.StandardCheckpointer()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "Metadata file does not exist": the manager keeps it one level up
    try:
        metadata = checkpointer.metadata(state_dir)
    finally:
        absl.setLevel(level)
    metadata = getattr(metadata, "item_metadata", metadata)
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # whatever topology saved it
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=here), metadata,
                          is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    tree = checkpointer.restore(state_dir, target)
    flat = flatten({"params": tree.get("params", {}), "model_state": tree.get("model_state", {})})
    return {k: np.asarray(v) for k, v in flat.items()}


def load_pretrained(state: TrainState, source: Any, *, skip_mismatched: bool = False,
                    exclude: tuple[str, ...] = ()) -> tuple[TrainState, TransferReport]:
    """`state` with every parameter (and model-state array) of `source` that fits, and a report.

    The optimizer state is initialised again for the new parameters.

    Args:
      state: a fresh state of the new model (`create_train_state`).
      source: see `read_weights`.
      skip_mismatched: keep the new initialisation where a shape differs (e.g. a new head)
        instead of raising.
      exclude: regular expressions on paths not to load (e.g. `("^params/head/",)`).

    Raises:
      ValueError: shapes that differ (without `skip_mismatched`), naming every path with both
        shapes; nothing loadable at all.
    """
    import re

    weights = read_weights(source)
    patterns = [re.compile(p) for p in exclude]
    target = {**flatten(state.params, "params/"), **flatten(state.model_state, "model_state/")}
    loaded, initialised, mismatched, new = [], [], [], dict(target)
    for path, value in target.items():
        if path not in weights or any(p.search(path) for p in patterns):
            initialised.append(path)
        elif tuple(weights[path].shape) != tuple(value.shape):
            mismatched.append(f"{path}: source {tuple(weights[path].shape)} vs model {tuple(value.shape)}")
        else:
            loaded.append(path)
            sharding = getattr(value, "sharding", None)
            array = np.asarray(weights[path], value.dtype)
            new[path] = jax.device_put(array, sharding) if sharding is not None else jnp.asarray(array)
    ignored = sorted(set(weights) - set(target))
    report = TransferReport(tuple(loaded), tuple(initialised), tuple(ignored), tuple(mismatched))
    if mismatched and not skip_mismatched:
        raise ValueError(f"load_pretrained: {len(mismatched)} array(s) of the source do not fit the model: "
                         f"{'; '.join(mismatched)}. Fix: pass skip_mismatched=True to keep the new model's "
                         f"initialisation for them (e.g. a new head), or exclude=(...) those paths.")
    if not loaded:
        raise ValueError(f"load_pretrained: no array of the source matches the model by path and shape; the "
                         f"source has {sorted(weights)[:8]}..., the model {sorted(target)[:8]}.... Fix: load "
                         f"weights saved from the same architecture (parameter names must match).")
    params = _unflatten_like(state.params, new, "params/")
    model_state = _unflatten_like(state.model_state, new, "model_state/")
    return state.replace(params=params, model_state=model_state, opt_state=state.tx.init(params)), report


__all__ = ["TransferReport", "flatten", "load_pretrained", "read_weights"]
