"""jnn.testing's mutation suite: every planted bug is caught by the check the README names, and no
correct model raises a false alarm. The bugs and models live in tests/_mutants.py."""
import re
import pathlib

import jax
import pytest

import jnn
from tests._mutants import BUGS, CORRECT

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _check(subject, **kwargs):
    with jax.numpy_rank_promotion(subject.rank_promotion):
        return jnn.testing.check_model(subject.make(), subject.inputs, subject.labels, loss_fn=subject.loss_fn,
                                       **subject.options, **kwargs)


@pytest.mark.parametrize("name", sorted(BUGS))
def test_each_bug_is_caught_by_its_check(name):
    subject, check, _ = BUGS[name]
    with pytest.raises(jnn.testing.ModelCheckError) as caught:
        _check(subject, checks=(check,))
    failure = caught.value.failures[0]
    print(f"{name}:\n{failure}")
    assert failure.check == check
    assert failure.where, "a failure names where"  # a path, a module or a source line
    assert failure.expected and failure.got and failure.cause and failure.fix


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_models_pass_every_check(name):
    report = _check(CORRECT[name])
    print(f"{name}:\n{report}")
    assert report.passed


def test_readme_table_lists_every_bug_with_its_check():
    text = README.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (.+?) \| `(\w+)` \|", text, flags=re.M))
    assert len(BUGS) >= 15 and len(CORRECT) >= 6
    for name, (_, check, _) in BUGS.items():
        assert rows.get(name) == check, f"README row for {name!r}: expected check {check!r}, got {rows.get(name)!r}"
