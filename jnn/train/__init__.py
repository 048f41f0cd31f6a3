"""Training: the model contract, the state pytree, the pure steps, and the loop.

Names are imported on first use (as in `jnn`), so `jnn.train.preemption` (signal handling, used by
the `jnn` command before anything heavy) loads without JAX.
"""
from __future__ import annotations

from jnn import _lazy

_NAMES = {"LinenModel": "jnn.train.model", "NnxModel": "jnn.train.nnx_model",
          **{n: "jnn.train.state" for n in ("InputSpec", "ModelSpec", "TrainState", "abstract_train_state",
                                            "create_train_state", "to_nnx")},
          **{n: "jnn.train.step" for n in ("Step", "check_batch", "make_eval_step", "make_train_step")}}

__getattr__ = _lazy.attributes(__name__, _NAMES, globals())


__all__ = sorted(_NAMES)
