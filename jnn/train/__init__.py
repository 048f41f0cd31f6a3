"""Training: the state pytree, the pure steps, and the loop."""
from jnn.train.state import InputSpec, TrainState, abstract_train_state, create_train_state
from jnn.train.step import check_batch, make_eval_step, make_train_step

__all__ = ["InputSpec", "TrainState", "abstract_train_state", "create_train_state", "check_batch", "make_eval_step",
           "make_train_step"]
