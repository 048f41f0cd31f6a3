"""jnn: JAX functional neural networks.

flax.linen models, optax optimizers and one pure train step `(state, batch) -> (state, metrics)`
that the caller compiles with `jax.jit`, batches with `jax.vmap`, or spreads over devices.
"""
from jnn import losses, metrics, optim
from jnn.optim import OptimConfig, make_optimizer, make_schedule
from jnn.train.state import InputSpec, TrainState, create_train_state
from jnn.train.step import check_batch, make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = [
    "InputSpec",
    "OptimConfig",
    "TrainState",
    "check_batch",
    "create_train_state",
    "losses",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "metrics",
    "optim",
]
