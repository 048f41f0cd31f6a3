"""Training: the model contract, the state pytree, the pure steps, and the loop."""
from jnn.train.model import LinenModel
from jnn.train.nnx_model import NnxModel
from jnn.train.state import InputSpec, ModelSpec, TrainState, abstract_train_state, create_train_state, to_nnx
from jnn.train.step import Step, check_batch, make_eval_step, make_train_step

__all__ = ["InputSpec", "LinenModel", "ModelSpec", "NnxModel", "Step", "TrainState", "abstract_train_state",
           "create_train_state", "check_batch", "make_eval_step", "make_train_step", "to_nnx"]
