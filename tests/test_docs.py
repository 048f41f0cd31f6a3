"""The API reference builds with warnings as errors, every public name has its page, and every
docstring example runs.

The examples are written as a user's code: they use the README's names, which this file defines
once (`namespace`): `MyModel` (the README's MLP with dropout), `model = MyModel()`, the bundled
digits (`splits`, `x`, `y` the train split, `batch` its first 64 examples), `state` (a fresh
`create_train_state(MyModel(), adam)` per example), `data` / `val` (train / validation pipelines),
`loss` ("cross_entropy"), `run_dir` / `tmp` (a temporary directory), `loader_state` and
`template_state`. Examples that cannot run here (a second host) are marked `# doctest: +SKIP`;
`NOT_RUN_HERE` names the examples another test runs.
"""
import doctest
import importlib
import os
import pathlib
import pkgutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jnn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _docstring_tests() -> dict[str, doctest.DocTest]:
    """Every docstring with examples in the jnn package, once each (re-exports are found twice)."""
    finder, found, seen = doctest.DocTestFinder(), {}, set()
    for info in pkgutil.walk_packages(jnn.__path__, "jnn."):
        module = importlib.import_module(info.name)
        for test in finder.find(module, info.name):
            where = (test.filename, test.lineno, test.docstring)
            if test.examples and where not in seen:
                seen.add(where)
                found[test.name] = test
    return found


DOCTESTS = _docstring_tests()
# Examples these tests do not run, and where they do run.
NOT_RUN_HERE = {
    "jnn.testing._parallel.check_parallel": "compiles every parallel path (20 s); tests/test_testing.py runs it",
    "jnn.testing": "the README's 'Testing your own model' makes the same call (tests/test_readme.py; 12 s)",
    "jnn.testing.check_model": "the same call again",
}


class MyModel(nn.Module):
    """The README's model."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(64)(x.reshape(len(x), -1)))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def base():
    splits = jnn.data.load("digits")
    x, y = splits.train["inputs"], splits.train["labels"]
    state = jnn.create_train_state(MyModel(), optax.adam(1e-3), x[:1], jax.random.key(0))
    return splits, x, y, state


def namespace(base, tmp_path) -> dict:
    splits, x, y, state = base
    fresh = jax.tree.map(jnp.copy, state)  # examples donate their state to compiled steps
    return {
        "jnn": jnn, "jax": jax, "jnp": jnp, "np": np, "optax": optax, "nn": nn, "nnx": nnx, "MyModel": MyModel,
        "model": MyModel(), "splits": splits, "x": x, "y": y, "batch": {"inputs": x[:64], "labels": y[:64]},
        "state": fresh, "template_state": jax.tree.map(jnp.copy, state), "loader_state": {"next_index": 0},
        "data": jnn.data.Pipeline(splits.train, 64, seed=0),
        "val": jnn.data.Pipeline(splits.val, 256, train=False), "loss": "cross_entropy",
        "run_dir": tmp_path, "tmp": str(tmp_path),
    }


def test_every_docstring_with_examples_is_collected():
    names = set(DOCTESTS)
    assert {"jnn.train.loop.fit", "jnn.pruning", "jnn._summary", "jnn.profiling",
            "jnn.models._sampling.sample"} <= names
    assert len(names) >= 29 and set(NOT_RUN_HERE) <= names


@pytest.mark.parametrize("name", sorted(set(DOCTESTS) - set(NOT_RUN_HERE)))
def test_docstring_examples_run(name, base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    test = DOCTESTS[name]
    test = doctest.DocTest(test.examples, {**test.globs, **namespace(base, tmp_path)}, test.name, test.filename,
                           test.lineno, test.docstring)
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)
    skipped = [e for e in test.examples if e.options.get(doctest.SKIP)]
    assert result.attempted == len(test.examples) - len(skipped) > 0 or skipped == test.examples


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(tmp_path):
    """`python -m sphinx -W -b html docs docs/_build/html`, the README's command, into a temporary directory."""
    out = tmp_path / "html"
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "A tour" in index and "API reference" in index  # the README is the first page
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        conf = importlib.import_module("conf")
    finally:
        sys.path.remove(str(ROOT / "docs"))
    required = {"jnn", "jnn.parallel", "jnn.testing", "jnn.models", "jnn.data", "jnn.writers", "jnn.adversarial",
                "jnn.lora", "jnn.pruning", "jnn.quantize", "jnn.precision", "jnn.transfer", "jnn.vmap", "jnn.metrics",
                "jnn.losses", "jnn.optim", "jnn.checkpoint", "jnn.trackers", "jnn.profiling"}
    assert required <= set(conf.MODULES)
    pages = 0
    for module in conf.MODULES:
        assert (out / "api" / f"{module}.html").exists()
        for name in conf.public_names(module):
            assert (out / "api" / "generated" / f"{module}.{name}.html").exists(), f"{module}.{name} has no page"
            pages += 1
    assert pages > 250
    assert "jnn.summary" in (out / "api" / "generated" / "jnn.summary.html").read_text(encoding="utf-8")
