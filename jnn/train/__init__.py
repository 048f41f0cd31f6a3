"""Training: the model contract, the state pytree, the pure steps, and the loop.

Names are imported on first use (as in `jnn`), so `jnn.train.preemption` (signal handling, used by
the `jnn` command before anything heavy) loads without JAX.
"""
from __future__ import annotations

import importlib
from typing import Any

_NAMES = {"LinenModel": "jnn.train.model", "NnxModel": "jnn.train.nnx_model",
          **{n: "jnn.train.state" for n in ("InputSpec", "ModelSpec", "TrainState", "abstract_train_state",
                                            "create_train_state", "to_nnx")},
          **{n: "jnn.train.step" for n in ("Step", "check_batch", "make_eval_step", "make_train_step")}}


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'jnn.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_NAMES[name]), name)
    globals()[name] = value
    return value


__all__ = sorted(_NAMES)
