"""`model_tests`: every check on your model as pytest tests, in one line of your test suite."""
from __future__ import annotations

from typing import Any, Callable


def model_tests(model: Any, inputs: Any, labels: Any, *, loss_fn: Any = "cross_entropy", checks=None, skip=(),
                parallel: bool = True, devices: int = 8, precision: Any = None,
                model_fn: Callable[[Any], Any] | None = None, train_kwarg: Any = "auto",
                fast_compile: bool = True) -> Callable:
    """A pytest test function parametrised over `jnn.testing`'s checks (and `check_parallel`).

    Example (in your `tests/test_my_model.py`):
      >>> test_my_model = jnn.testing.model_tests(MyModel(), x[:16], y[:16], loss_fn="cross_entropy")

    pytest then collects `test_my_model[finite]`, `test_my_model[gradients]`, ...,
    `test_my_model[parallel]`: one test per check, sharing one state and its compiled step. A check
    that does not apply to the model (no batch statistics, no randomness) is reported as skipped
    with the reason.

    Args:
      model, inputs, labels, loss_fn, checks, skip, precision, model_fn, train_kwarg, fast_compile:
        as for `check_model`.
      parallel: also run `check_parallel` on `devices` devices (fake CPU devices in a subprocess
        when the test process has fewer); the batch size must then be a multiple of `devices`.
      devices: the devices of the parallel check.
    """
    import pytest  # noqa: PLC0415 - only where pytest runs

    from jnn.testing import CHECKS, Case, NotApplicable, _run_one, check_parallel, compiling_fast  # noqa: PLC0415
    from jnn.train.batch import check_batch  # noqa: PLC0415

    names = list(CHECKS) if checks is None else [checks] if isinstance(checks, str) else list(checks)
    names = [n for n in names if n not in set(skip)] + (["parallel"] if parallel else [])
    cache: dict[str, Case] = {}

    @pytest.mark.parametrize("check", names)
    def test(check):
        with compiling_fast(fast_compile):
            run(check)

    def run(check):
        if check == "parallel":
            print(check_parallel(model, inputs, labels, loss_fn=loss_fn, devices=devices, precision=precision,
                                 train_kwarg=train_kwarg, fast_compile=fast_compile))
            return
        if "case" not in cache:
            case = Case(model, inputs, labels, loss_fn, precision, model_fn, train_kwarg)
            check_batch(case.state, case.batch, where="jnn.testing.model_tests")
            cache["case"] = case
        try:
            print(_run_one(cache["case"], check))
        except NotApplicable as why:
            pytest.skip(f"{check}: not applicable: {why}")

    return test
