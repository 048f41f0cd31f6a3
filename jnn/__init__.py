"""jnn: JAX functional neural networks.

flax models (linen or nnx), optax optimizers and one pure train step `(state, batch) -> (state, metrics)`
that the caller compiles with `jax.jit`, batches with `jax.vmap`, or spreads over devices.

`import jnn` imports nothing heavy: each name below is imported on first use (PEP 562), so a
script pays for JAX, flax, orbax or grain only when it uses them, and the `jnn` command answers
what needs none of them (a refused run directory, `--help`) at once. It does set jnn's XLA CPU
option as the process default first (`jnn.compiler`), while JAX's backends have not started.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from jnn import _xla_default

_xla_default.set_process_default()  # before anything can start JAX's backends: XLA reads its flags once

__version__ = "0.1.0"

# public name -> the module that defines it
_NAMES = {
    "Checkpointer": "jnn.checkpoint", "CheckpointError": "jnn.checkpoint",
    "compiler_options": "jnn.compiler", "jit": "jnn.compiler",
    "Exported": "jnn._export", "ExportError": "jnn._export", "export": "jnn._export",
    "LoadedModel": "jnn.predict", "load": "jnn.predict",
    "Config": "jnn.config", "DataConfig": "jnn.config", "ModelConfig": "jnn.config", "TrainConfig": "jnn.config",
    "Summary": "jnn._summary", "SummaryRow": "jnn._summary", "summary": "jnn._summary",
    "OptimConfig": "jnn.optim", "make_optimizer": "jnn.optim", "make_schedule": "jnn.optim",
    "EarlyStopping": "jnn.train.loop", "FitResult": "jnn.train.loop", "NonFiniteError": "jnn.train.loop",
    "evaluate": "jnn.train.loop", "fit": "jnn.train.loop", "pad_batch": "jnn.train.loop",
    "PREEMPTED_EXIT_CODE": "jnn.train.preemption", "Preempted": "jnn.train.preemption",
    "InputSpec": "jnn.train.state", "ModelSpec": "jnn.train.state", "TrainState": "jnn.train.state",
    "abstract_train_state": "jnn.train.state", "create_train_state": "jnn.train.state", "to_nnx": "jnn.train.state",
    "Step": "jnn.train.step", "check_batch": "jnn.train.step", "make_eval_step": "jnn.train.step",
    "make_train_step": "jnn.train.step",
    "create_ensemble": "jnn.vmap", "ensemble_train_step": "jnn.vmap", "make_dp_train_step": "jnn.vmap",
    "per_example_grads": "jnn.vmap",
}
_SUBMODULES = ("adversarial", "config", "data", "layers", "lora", "losses", "metrics", "models", "optim",
               "parallel", "precision", "predict", "presets", "pruning", "quantize", "testing", "transfer", "vmap",
               "writers")

if TYPE_CHECKING:  # what static tools see: the eager imports
    from jnn import (adversarial, config, data, layers, lora, losses, metrics, models, optim, parallel,  # noqa: F401
                     precision, predict, presets, pruning, quantize, testing, transfer, vmap, writers)
    from jnn._export import Exported, ExportError, export  # noqa: F401
    from jnn._summary import Summary, SummaryRow, summary  # noqa: F401
    from jnn.checkpoint import Checkpointer, CheckpointError  # noqa: F401
    from jnn.compiler import compiler_options, jit  # noqa: F401
    from jnn.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: F401
    from jnn.optim import OptimConfig, make_optimizer, make_schedule  # noqa: F401
    from jnn.predict import LoadedModel, load  # noqa: F401
    from jnn.train.loop import EarlyStopping, FitResult, NonFiniteError, evaluate, fit, pad_batch  # noqa: F401
    from jnn.train.preemption import PREEMPTED_EXIT_CODE, Preempted  # noqa: F401
    from jnn.train.state import (InputSpec, ModelSpec, TrainState, abstract_train_state,  # noqa: F401
                                 create_train_state, to_nnx)
    from jnn.train.step import Step, check_batch, make_eval_step, make_train_step  # noqa: F401
    from jnn.vmap import create_ensemble, ensemble_train_step, make_dp_train_step, per_example_grads  # noqa: F401


def __getattr__(name: str) -> Any:
    """Imports a public name (or any jnn submodule, e.g. `jnn.experiment`) on first use."""
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f"jnn.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"jnn.{name}":
                raise
            raise AttributeError(f"module 'jnn' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'jnn' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted([*_NAMES, *_SUBMODULES])
