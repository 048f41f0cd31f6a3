"""jnn: JAX functional neural networks.

flax models (linen or nnx), optax optimizers and one pure train step `(state, batch) -> (state, metrics)`
that the caller compiles with `jax.jit`, batches with `jax.vmap`, or spreads over devices.
"""
from jnn import compiler as _compiler

_compiler.set_process_default()  # before anything can start JAX's backends: XLA reads its flags once

from jnn import (adversarial, config, data, layers, lora, losses, metrics, models, optim, parallel, precision,
                 predict, presets, pruning, quantize, testing, transfer, vmap, writers)
from jnn.checkpoint import Checkpointer, CheckpointError
from jnn.compiler import compiler_options, jit
from jnn._export import Exported, ExportError, export
from jnn.predict import LoadedModel, load
from jnn.config import Config, DataConfig, ModelConfig, TrainConfig
from jnn._summary import Summary, SummaryRow, summary
from jnn.optim import OptimConfig, make_optimizer, make_schedule
from jnn.train.loop import EarlyStopping, FitResult, NonFiniteError, evaluate, fit, pad_batch
from jnn.train.preemption import PREEMPTED_EXIT_CODE, Preempted
from jnn.train.state import (InputSpec, ModelSpec, TrainState, abstract_train_state, create_train_state,
                              to_nnx)
from jnn.train.step import Step, check_batch, make_eval_step, make_train_step
from jnn.vmap import create_ensemble, ensemble_train_step, make_dp_train_step, per_example_grads

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "Config",
    "DataConfig",
    "EarlyStopping",
    "ExportError",
    "Exported",
    "FitResult",
    "InputSpec",
    "LoadedModel",
    "ModelSpec",
    "NonFiniteError",
    "PREEMPTED_EXIT_CODE",
    "Preempted",
    "Step",
    "Summary",
    "SummaryRow",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainState",
    "abstract_train_state",
    "check_batch",
    "compiler_options",
    "adversarial",
    "config",
    "create_ensemble",
    "create_train_state",
    "data",
    "ensemble_train_step",
    "evaluate",
    "export",
    "fit",
    "jit",
    "layers",
    "load",
    "lora",
    "losses",
    "make_dp_train_step",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "metrics",
    "models",
    "optim",
    "pad_batch",
    "parallel",
    "per_example_grads",
    "precision",
    "predict",
    "presets",
    "pruning",
    "quantize",
    "summary",
    "testing",
    "transfer",
    "to_nnx",
    "vmap",
    "writers",
]
