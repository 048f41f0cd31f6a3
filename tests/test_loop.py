"""fit(): evaluation, early stopping, checkpoints, and a resumed run that is bit-for-bit identical."""
import chex
import jax
import numpy as np
import optax
import pytest

import jnn
from jnn.checkpoint import Checkpointer
from jnn.train.loop import EarlyStopping, evaluate, fit, pad_batch
from tests._tiny import TinyBNDropout

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

CE = optax.softmax_cross_entropy_with_integer_labels


def _splits():
    splits = jnn.data.load("digits")
    flat = lambda a: {"inputs": a["inputs"].reshape(len(a["inputs"]), -1), "labels": a["labels"]}
    return flat(splits.train), flat(splits.val)


def _state():
    train, _ = _splits()
    return jnn.create_train_state(TinyBNDropout(classes=10, width=32, rate=0.1),
                                  jnn.make_optimizer(name="adam", learning_rate=3e-3), train["inputs"][:1],
                                  jax.random.key(0))


def test_pad_batch_masks_padding():
    batch = {"inputs": np.ones((3, 2), np.float32), "labels": np.array([1, 2, 3])}
    padded = pad_batch(batch, 5)
    assert padded["inputs"].shape == (5, 2)
    np.testing.assert_array_equal(padded["mask"], [1, 1, 1, 0, 0])


def test_fit_trains_evaluates_and_logs():
    train, val = _splits()
    result = fit(_state(), jnn.data.Pipeline(train, 32), num_steps=60, loss_fn=CE, eval_every=20, log_every=20,
                 eval_data=jnn.data.Pipeline(val, 50, train=False), progress=False)
    evals = [r for r in result.history if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert evals[-1]["accuracy"] > 0.8
    trains = [r for r in result.history if r["split"] == "train"]
    assert trains[-1]["loss"] < trains[0]["loss"]
    assert {"loss", "accuracy", "grad_norm", "learning_rate", "examples_per_sec"} <= set(trains[0])
    # evaluate() with padded partial batches equals evaluation in one full batch.
    whole = evaluate(result.state, [val], loss_fn=CE)
    batched = evaluate(result.state, jnn.data.Pipeline(val, 50, train=False), loss_fn=CE)
    np.testing.assert_allclose(batched["accuracy"], whole["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(batched["loss"], whole["loss"], rtol=1e-5)


def test_early_stopping_stops_after_patience():
    stopper = EarlyStopping("loss", mode="min", patience=2)
    assert not stopper.update(1, {"loss": 1.0})
    assert not stopper.update(2, {"loss": 0.5})
    assert not stopper.update(3, {"loss": 0.6})
    assert stopper.update(4, {"loss": 0.55})
    assert stopper.best == 0.5 and stopper.best_step == 2
    with pytest.raises(ValueError, match=r"metric 'acc' is not among the evaluation metrics \['loss'\]"):
        EarlyStopping("acc").update(1, {"loss": 1.0})
    train, val = _splits()
    result = fit(_state(), jnn.data.Pipeline(train, 32), num_steps=1000, loss_fn=CE, eval_every=5,
                 eval_data=jnn.data.Pipeline(val, 144, train=False), progress=False,
                 early_stopping=EarlyStopping("accuracy", min_delta=0.5, patience=2))  # can't improve by 0.5
    assert result.stopped_early
    assert result.state.step == 15  # evaluations at 5 (best), 10, 15 -> stop


def test_resumed_run_is_bit_for_bit_identical(tmp_path):
    train, _ = _splits()
    pipeline = lambda: jnn.data.Pipeline(train, 32, seed=3, augment=None)
    straight = fit(_state(), pipeline(), num_steps=30, loss_fn=CE, progress=False).state

    with Checkpointer(tmp_path / "ckpt") as ckpt:
        fit(_state(), pipeline(), num_steps=12, loss_fn=CE, eval_every=12, checkpointer=ckpt, progress=False)
    # A new process would rebuild everything from the config: a fresh template state and pipeline.
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        state, data_state = ckpt.restore(_state())
    assert int(state.step) == 12 and data_state == {"next_index": 12}
    resumed = fit(state, pipeline(), num_steps=30, loss_fn=CE, data_state=data_state, progress=False).state
    chex.assert_trees_all_equal(resumed.params, straight.params)
    chex.assert_trees_all_equal(resumed.opt_state, straight.opt_state)
    chex.assert_trees_all_equal(resumed.model_state, straight.model_state)


def test_resumed_run_keeps_its_early_stopping_patience(tmp_path):
    """Stopped between evaluations and resumed, a run stops early at the same step as one that never stopped."""
    train, val = _splits()
    pipeline = lambda: jnn.data.Pipeline(train, 32, seed=3, augment=None)
    kwargs = dict(loss_fn=CE, eval_every=5, eval_data=jnn.data.Pipeline(val, 144, train=False), progress=False)
    stopper = lambda: EarlyStopping("accuracy", min_delta=1.0, patience=3)  # never improves after step 5
    straight = fit(_state(), pipeline(), num_steps=1000, early_stopping=stopper(), **kwargs)
    assert straight.stopped_early and int(straight.state.step) == 20  # best at 5; 10, 15, 20 -> stop

    with Checkpointer(tmp_path / "ckpt") as ckpt:  # evaluations at 5 and 10 (patience 1 of 3 spent), none at 12
        stopped = fit(_state(), pipeline(), num_steps=1000, stop_at=12, early_stopping=stopper(), checkpointer=ckpt,
                      **kwargs)
        assert [r["step"] for r in stopped.history if r["split"] == "eval"] == [5, 10]
        assert ckpt.latest_step() == 12 and ckpt.metrics(12) is None  # saved, not evaluated
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        state, data_state = ckpt.restore(_state())
    assert int(state.step) == 12
    assert data_state["next_index"] == 12 and data_state["early_stopping"]["wait"] == 1
    assert data_state["early_stopping"]["best_step"] == 5
    resumed_stopper = stopper()
    resumed = fit(state, pipeline(), num_steps=1000, early_stopping=resumed_stopper, data_state=data_state, **kwargs)
    assert resumed.stopped_early and int(resumed.state.step) == 20  # a fresh patience would run to 25
    assert resumed_stopper.best_step == 5 and resumed.best == straight.best  # the whole record, loss too
    chex.assert_trees_all_equal(resumed.state.params, straight.state.params)
    assert resumed.data_state["early_stopping"]["wait"] == 3

    # Continuing a run that had stopped early stops at once; a different metric is refused.
    again = fit(resumed.state, pipeline(), num_steps=1000, early_stopping=stopper(), data_state=resumed.data_state,
                **kwargs)
    assert again.stopped_early and int(again.state.step) == 20
    with pytest.raises(ValueError, match=r"counters are for metric 'accuracy' \(max\), but early_stopping watches "
                                         r"'loss' \(min\)"):
        fit(again.state, pipeline(), num_steps=1000, early_stopping=EarlyStopping("loss", "min"),
            data_state=resumed.data_state, **kwargs)


def test_stop_at_the_restored_step_does_not_save_it_twice(tmp_path):
    train, _ = _splits()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        fit(_state(), jnn.data.Pipeline(train, 32), num_steps=100, stop_at=6, loss_fn=CE, checkpointer=ckpt,
            progress=False)
        state, data_state = ckpt.restore(_state())
        result = fit(state, jnn.data.Pipeline(train, 32), num_steps=100, stop_at=6, loss_fn=CE, checkpointer=ckpt,
                     data_state=data_state, progress=False)  # a preemption wrapper called again at its deadline
        assert int(result.state.step) == 6 and ckpt.all_steps() == [6]


def test_interrupt_saves_a_checkpoint_and_reraises(tmp_path):
    train, _ = _splits()

    class Interrupting:
        def __init__(self):
            self.it, self.n = iter(jnn.data.Pipeline(train, 32)), 0

        def __next__(self):
            self.n += 1
            if self.n == 8:
                raise KeyboardInterrupt
            return next(self.it)

        def get_state(self):
            return self.it.get_state()

    with Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(KeyboardInterrupt):
            fit(_state(), Interrupting(), num_steps=100, loss_fn=CE, checkpointer=ckpt, progress=False)
        assert ckpt.all_steps() == [7]


# ---- bugs of the loop's contract ----


def _small_batches(n=3, size=16, seed=0):
    train, _ = _splits()
    return [{k: v[i * size:(i + 1) * size] for k, v in train.items()} for i in range(n)]


def test_finite_data_that_ends_early_says_how_many_steps_it_had():
    with pytest.raises(ValueError, match="the training data ended after step 3, before num_steps=5"):
        fit(_state(), _small_batches(3), num_steps=5, loss_fn=CE, log_every=1)


def test_early_stopping_without_eval_data_is_refused():
    with pytest.raises(ValueError, match="early_stopping watches an evaluation metric, but no eval_data"):
        fit(_state(), _small_batches(3), num_steps=3, loss_fn=CE, early_stopping=EarlyStopping("accuracy"))


def test_a_given_train_step_without_evaluation_needs_no_loss_fn():
    step = jax.jit(jnn.make_train_step(CE), donate_argnums=0)
    result = fit(_state(), _small_batches(3), num_steps=3, train_step=step, log_every=1)
    assert int(result.state.step) == 3


@pytest.mark.parametrize("kwargs", [{"num_steps": -5}, {"log_every": 0}, {"eval_every": -1}, {"max_traces": 2}])
def test_out_of_range_loop_arguments_are_refused(kwargs):
    with pytest.raises(ValueError, match="fit: "):
        fit(_state(), _small_batches(3), **{"num_steps": 3, "loss_fn": CE, **kwargs})


def test_max_traces_names_the_batch_entry_whose_shape_changed():
    batches = _small_batches(3)
    batches[2] = {k: v[:8] for k, v in batches[2].items()}  # a smaller last batch would re-compile
    with pytest.raises(ValueError, match=r"batch\['inputs'\] at step 2 has \(shape, dtype\) \(\(8, 64\), 'float32'\), "
                                         r"but the first batch had \(\(16, 64\), 'float32'\)"):
        fit(_state(), batches, num_steps=3, loss_fn=CE, log_every=1, max_traces=1)
    result = fit(_state(), _small_batches(3), num_steps=3, loss_fn=CE, log_every=1, max_traces=1)
    assert int(result.state.step) == 3


def _plateau_state(plateau):
    train, _ = _splits()
    tx = optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=3e-3), plateau.transform())
    return jnn.create_train_state(TinyBNDropout(classes=10, width=32, rate=0.1), tx, train["inputs"][:1],
                                  jax.random.key(0))


def test_fit_lowers_the_learning_rate_on_plateaus_and_a_resumed_run_continues_it(tmp_path):
    # mode="max" on the loss: every evaluation after the first "fails to improve" (the loss falls).
    plateau = jnn.optim.Plateau("loss", mode="max", factor=0.5, patience=1)
    train, val = _splits()
    pipeline = lambda: jnn.data.Pipeline(train, 32, seed=3, augment=None)
    evaluation = lambda: jnn.data.Pipeline(val, 64, train=False)
    kwargs = dict(num_steps=24, loss_fn=CE, eval_data=evaluation, eval_every=6, log_every=3, progress=False,
                  plateau=plateau)
    straight = fit(_plateau_state(plateau), pipeline(), **kwargs)
    rates = {r["step"]: r["learning_rate"] for r in straight.history if r["split"] == "train"}
    assert [rates[s] for s in (3, 6, 9, 12, 15, 18, 21, 24)] == pytest.approx(
        [3e-3, 3e-3, 3e-3, 3e-3, 1.5e-3, 1.5e-3, 7.5e-4, 7.5e-4])  # halved after the evaluations at 12, 18
    assert float(jnn.optim.plateau_scale(straight.state.opt_state)) == 0.125  # and at 24

    with Checkpointer(tmp_path / "ckpt") as ckpt:
        fit(_plateau_state(plateau), pipeline(), checkpointer=ckpt, **{**kwargs, "num_steps": 12})
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        state, data_state = ckpt.restore(_plateau_state(plateau))
    assert float(jnn.optim.plateau_scale(state.opt_state)) == 0.5  # the evaluation at 12 was saved with it
    resumed = fit(state, pipeline(), data_state=data_state, **kwargs).state
    chex.assert_trees_all_equal(resumed.params, straight.state.params)
    chex.assert_trees_all_equal(resumed.opt_state, straight.state.opt_state)


def test_a_plateau_needs_both_halves_and_evaluation_data():
    plateau = jnn.optim.Plateau()
    train, val = _splits()
    data = jnn.data.Pipeline(train, 32)
    evaluation = jnn.data.Pipeline(val, 64, train=False)
    with pytest.raises(ValueError, match=r"no plateau= to drive it.*Fix: pass the same Plateau"):
        fit(_plateau_state(plateau), data, num_steps=2, loss_fn=CE, eval_data=evaluation)
    with pytest.raises(ValueError, match=r"has no plateau.transform\(\) in its chain"):
        fit(_state(), data, num_steps=2, loss_fn=CE, eval_data=evaluation, plateau=plateau)
    with pytest.raises(ValueError, match=r"plateau= watches an evaluation metric, but no eval_data"):
        fit(_plateau_state(plateau), data, num_steps=2, loss_fn=CE, plateau=plateau)
