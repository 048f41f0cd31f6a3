"""`jnn.testing`: prove your own model (linen or nnx) trains correctly, with the checks jnn runs on its zoo.

`check_model(model, inputs, labels, loss_fn=...)` runs every check in `CHECKS` on one batch and
raises `ModelCheckError` listing each failure with the check's name, the parameter, state or
output path and index, what was expected, what was got, the likely cause and the fix. Each check
is also a function of its own (`check_finite`, `check_gradients`, ...). `check_parallel` proves the
model trains the same on every parallel path; `model_tests` turns all of it into pytest tests in one
line.

Example:
  >>> report = jnn.testing.check_model(MyModel(), x[:16], y[:16], loss_fn="cross_entropy")
  >>> print(report)                      # one line per check: passed, or not applicable and why
  output_shapes...passed...outputs (16, 10), the same in training and evaluation
  ...
  params_get_gradients...passed...all 4 parameter arrays get a gradient

What each check catches, and what none of them can, is tabulated in the README ("Testing your own
model") and proven by `tests/test_testing_mutations.py`, which plants those bugs.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
import traceback
from typing import Any, Callable

import jax

from jnn.testing import _checks
from jnn.testing._case import Case, compiling_fast
from jnn.testing._checks import NotApplicable
from jnn.testing._parallel import ParallelReport, check_parallel
from jnn.testing._pytest import model_tests
from jnn.testing._report import Failure, ModelCheckError
from jnn.train.batch import check_batch


@dataclasses.dataclass(frozen=True)
class Check:
    """One check: its name, the function of a `Case` that runs it, and the bugs it catches."""

    name: str
    run: Callable[[Case], str]
    catches: str


CHECKS: dict[str, Check] = {c.name: c for c in (
    Check("output_shapes", _checks.output_shapes,
          "outputs without a batch axis; train and eval outputs of different shapes or dtypes"),
    Check("finite", _checks.finite,
          "NaN/Inf in the initial parameters, outputs, loss, gradients or the state after a step"),
    Check("jit_matches_eager", _checks.jit_matches_eager,
          "Python behaviour that differs under tracing (numpy randomness, trace-time constants), in "
          "params, optimizer state, model state or metrics"),
    Check("no_retrace", _checks.no_retrace,
          "a step that compiles again every call: a variable whose dtype, shape or weak type changes"),
    Check("gradients", _checks.gradients,
          "a wrong custom gradient, a misplaced stop_gradient, a wrongly scaled loss gradient "
          "(float64 central differences, robust at ReLU / max-pool / abs kinks)"),
    Check("eval_deterministic", _checks.eval_deterministic,
          "dropout or noise left on in evaluation"),
    Check("eval_per_example", _checks.eval_per_example,
          "evaluation that uses batch statistics (BatchNorm mode wired backwards) or mixes examples"),
    Check("train_updates_state", _checks.train_updates_state,
          "batch statistics that never update in training"),
    Check("train_randomness", _checks.train_randomness,
          "dropout drawn from a fixed key (the same mask every step); randomness outside JAX keys"),
    Check("loss_per_example", _checks.loss_per_example,
          "a loss that couples examples: (B, 1) vs (B,) broadcast into (B, B), batch normalisation"),
    Check("params_get_gradients", _checks.params_get_gradients,
          "a layer defined but never used, a stop_gradient that cuts a parameter off the loss"),
)}


@dataclasses.dataclass(frozen=True)
class Result:
    """One check's outcome: "passed", "failed" or "not applicable", with a one-line detail."""

    check: str
    status: str
    detail: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Report:
    """The outcome of every check `check_model` ran."""

    results: tuple[Result, ...]

    @property
    def passed(self) -> bool:
        return all(r.status != "failed" for r in self.results)

    def __str__(self) -> str:
        width = max(len(r.check) for r in self.results)
        return "\n".join(f"{r.check:<{width}}  {r.status:<14}  {r.seconds:5.1f} s  {r.detail}" for r in self.results)


def _run_one(case: Case, name: str) -> str:
    """Runs one check; returns its summary. Raises `NotApplicable` or `ModelCheckError` (also when the
    model or loss raises inside the check: that is a finding too)."""
    try:
        return CHECKS[name].run(case)
    except (NotApplicable, ModelCheckError):
        raise
    except Exception as err:  # noqa: BLE001
        raise ModelCheckError(Failure(
            name, f"the check could not run: {type(err).__name__}: {err}".splitlines()[0], where=_where(err),
            expected="the model, the loss and the train step run on this batch",
            got=f"{type(err).__name__} (its message is on the first line)",
            cause="the model or the loss raised while this check ran it (the line above is its error)",
            fix="run the model and the loss on this batch by hand to see the whole traceback")) from err


_PATH = re.compile(r"\b(?:model_state|params|batch|outputs|labels|inputs)(?:\[[^\]]+\])+")


def _where(err: Exception) -> str:
    """The path an error names (jnn's errors name one), else the deepest frame of the user's code."""
    found = _PATH.search(str(err))
    if found:
        return found.group(0)
    library = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(os.path.dirname(jax.__file__)))
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(library)]
    return f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""


def _run(case: Case, names) -> Report:
    check_batch(case.state, case.batch, where="jnn.testing")  # a batch the model cannot take is the user's error
    results = []
    failures = []
    for name in names:
        start = time.perf_counter()
        try:
            detail, status = _run_one(case, name), "passed"
        except NotApplicable as why:
            detail, status = str(why), "not applicable"
        except ModelCheckError as err:
            failures.extend(err.failures)
            detail, status = err.failures[0].summary, "failed"
        results.append(Result(name, status, detail, time.perf_counter() - start))
    report = Report(tuple(results))
    if failures:
        failed = sum(r.status == "failed" for r in results)
        raise ModelCheckError(failures, f"jnn.testing: {failed} of {len(results)} checks failed.\n{report}")
    return report


def check_model(model: Any, inputs: Any, labels: Any, *, loss_fn: Any = "cross_entropy", checks=None,
                skip=(), precision: Any = None, model_fn: Callable[[Any], Any] | None = None,
                train_kwarg: Any = "auto", output_shapes: Any = None, fast_compile: bool = True) -> Report:
    """Runs the checks of `CHECKS` on a model, one batch and its loss.

    Example:
      >>> jnn.testing.check_model(MyModel(), x[:16], y[:16], loss_fn="cross_entropy").passed
      True

    Args:
      model: a flax.linen or flax.nnx module (nnx: already initialised; it is not changed).
      inputs: a batch of at least 4 examples: an array, or a tuple / dict of arrays (as for
        `create_train_state`).
      labels: the batch's labels (any pytree the loss takes).
      loss_fn: as for `jnn.make_train_step` (a `jnn.losses` name or `loss(outputs, labels)`).
      checks: names of the checks to run (default: all of `CHECKS`, in order).
      skip: names of checks not to run.
      precision: a `jnn.precision` policy to run the model under (the gradient check runs in
        float64 without it).
      model_fn: `dtype -> model`, used by the gradient check to build the model in float64 when
        converting it is not enough (layers that pin `dtype=jnp.float32` below a top level with
        no `dtype` attribute).
      train_kwarg: as for `jnn.create_train_state` (linen).
      output_shapes: the expected per-example output shape, e.g. `(10,)` (a pytree of tuples for
        tuple or dict outputs); checked with chex by the `output_shapes` check.
      fast_compile: on CPU, compile the checks' programs without XLA's backend optimisations
        (`jax_disable_most_optimizations`, put back afterwards): about 25% faster, the same
        tolerances. False compiles them as your training does.

    Returns:
      A `Report` of every check (passed, or not applicable and why).

    Raises:
      ModelCheckError: (an `AssertionError`) listing every failed check, with its path, what was
        expected and got, the likely cause and the fix; `err.checks` names them.
      ValueError: an unknown check name, or a batch of fewer than 4 examples.
    """
    names = list(CHECKS) if checks is None else [checks] if isinstance(checks, str) else list(checks)
    unknown = sorted((set(names) | set(skip)) - set(CHECKS))
    if unknown:
        raise ValueError(f"check_model: unknown check(s) {unknown}; expected names of {list(CHECKS)}.")
    case = Case(model, inputs, labels, loss_fn, precision, model_fn, train_kwarg, output_shapes)
    with compiling_fast(fast_compile):
        return _run(case, [n for n in names if n not in set(skip)])


def _one(name: str):
    def check(model: Any, inputs: Any, labels: Any, *, loss_fn: Any = "cross_entropy", precision: Any = None,
              model_fn: Callable[[Any], Any] | None = None, train_kwarg: Any = "auto",
              output_shapes: Any = None, fast_compile: bool = True) -> Report:
        return check_model(model, inputs, labels, loss_fn=loss_fn, checks=(name,), precision=precision,
                           model_fn=model_fn, train_kwarg=train_kwarg, output_shapes=output_shapes,
                           fast_compile=fast_compile)

    check.__name__ = check.__qualname__ = f"check_{name}"
    check.__doc__ = (f"Runs the `{name}` check alone (see `check_model` for the arguments).\n\n"
                     f"{CHECKS[name].run.__doc__ or ''}\n\nCatches: {CHECKS[name].catches}.\n")
    return check


check_output_shapes = _one("output_shapes")
check_finite = _one("finite")
check_jit_matches_eager = _one("jit_matches_eager")
check_no_retrace = _one("no_retrace")
check_gradients = _one("gradients")
check_eval_deterministic = _one("eval_deterministic")
check_eval_per_example = _one("eval_per_example")
check_train_updates_state = _one("train_updates_state")
check_train_randomness = _one("train_randomness")
check_loss_per_example = _one("loss_per_example")
check_params_get_gradients = _one("params_get_gradients")
check_step_jit_matches_eager = check_jit_matches_eager  # the 0.1 name


def check_gradients_float64(model_fn: Callable[[Any], Any], inputs: Any, labels: Any, *,
                            loss_fn: Any = "cross_entropy") -> Report:
    """The gradient check on a model built by `model_fn(dtype)` (the 0.1 form of `check_gradients`)."""
    import jax.numpy as jnp  # noqa: PLC0415

    return check_model(model_fn(jnp.float32), inputs, labels, loss_fn=loss_fn, checks=("gradients",),
                       model_fn=model_fn)


__all__ = ["CHECKS", "Case", "Check", "Failure", "ModelCheckError", "NotApplicable", "ParallelReport", "Report",
           "Result", "check_eval_deterministic", "check_eval_per_example", "check_finite", "check_gradients",
           "check_gradients_float64", "check_jit_matches_eager", "check_loss_per_example", "check_model",
           "check_no_retrace", "check_output_shapes", "check_parallel", "check_params_get_gradients",
           "check_step_jit_matches_eager", "check_train_randomness", "check_train_updates_state", "model_tests"]
