"""jnn.testing itself: messages name the path, the gradient check locates the wrong element, the
legacy names work, check_parallel compares every path (and catches an unsynchronised BatchNorm),
and model_tests gives one pytest test per check. The planted-bug suite is test_testing_mutations.py."""
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jnn
from tests._mutants import (BUGS, CORRECT, NnxBNDropout, NoisyMomentumBN, TwoInputs, WeakCounter, Y, X, B, C,
                            F)
from tests._tiny import TinyBNDropout, TinyMLP

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py


def _failure(model, inputs=X, labels=Y, **kwargs):
    with pytest.raises(jnn.testing.ModelCheckError) as caught, jax.numpy_rank_promotion("allow"):
        jnn.testing.check_model(model, inputs, labels, **kwargs)
    return caught.value.failures[0]


def test_failures_name_the_state_leaf():
    retrace = _failure(WeakCounter(), checks="no_retrace")
    assert retrace.where == "state.model_state['counters']['seen']"
    assert "weakly typed" in retrace.expected and "weakly typed" not in retrace.got
    eager = _failure(NoisyMomentumBN(), checks="jit_matches_eager")
    assert eager.where.startswith("model_state['batch_stats']['mean'][")


def test_gradient_check_locates_the_wrong_element():
    """A backward rule wrong in one element of one kernel: the failure names that element."""

    @jax.custom_vjp
    def tagged(w):
        return w

    tagged.defvjp(lambda w: (w, None), lambda _, g: (g.at[2, 1].multiply(3.0),))

    class OneWrongElement(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.normal(0.5), (F, 8))
            return nn.Dense(C)(jnp.tanh(x @ tagged(w)))

    failure = _failure(OneWrongElement(), checks="gradients")
    assert failure.where == "params['w'][2, 1]", failure
    assert "ratio 3" in failure.got


def test_gradient_check_needs_float64_or_says_how():
    class PinnedFloat32(nn.Module):  # layers pin float32; no top-level dtype to set
        @nn.compact
        def __call__(self, x):
            return nn.Dense(C, dtype=jnp.float32, param_dtype=jnp.float32)(x)

    failure = _failure(PinnedFloat32(), checks="gradients")
    assert "float64" in failure.summary and "model_fn" in failure.fix

    class Configurable(nn.Module):
        dtype: jnp.dtype = jnp.float32

        @nn.compact
        def __call__(self, x):
            return nn.Dense(C, dtype=self.dtype, param_dtype=self.dtype)(x)

    jnn.testing.check_gradients(PinnedFloat32(), X, Y, model_fn=lambda dtype: Configurable(dtype))
    jnn.testing.check_gradients(Configurable(), X, Y)  # converted by jnn: its top-level dtype is set


def test_legacy_names_still_work():
    jnn.testing.check_gradients_float64(lambda dtype: TinyMLP(classes=C, width=4, dtype=dtype), X, Y)
    jnn.testing.check_step_jit_matches_eager(TinyBNDropout(classes=C), X, Y)
    with pytest.raises(AssertionError, match="central differences"):
        bug, _, _ = BUGS["wrong custom_vjp (linen)"]
        jnn.testing.check_gradients_float64(lambda dtype: bug.make(), X, Y)


def test_report_lists_every_check_and_refuses_unknown_names():
    report = jnn.testing.check_model(TinyMLP(classes=C), X, Y, skip=("gradients", "jit_matches_eager"))
    assert [r.check for r in report.results] == [c for c in jnn.testing.CHECKS
                                                 if c not in ("gradients", "jit_matches_eager")]
    assert {r.check: r.status for r in report.results}["train_updates_state"] == "not applicable"
    with pytest.raises(ValueError, match="unknown check"):
        jnn.testing.check_model(TinyMLP(), X, Y, checks=("finit",))
    with pytest.raises(ValueError, match="at least 4"):
        jnn.testing.check_model(TinyMLP(classes=C), X[:2], Y[:2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):  # a user error, before any check
        jnn.testing.check_model(TinyMLP(classes=3), X, np.full(B, 3, np.int32))


def test_expected_output_shapes():
    jnn.testing.check_output_shapes(TinyMLP(classes=C), X, Y, output_shapes=(C,))
    failure = _failure(TinyMLP(classes=C), checks="output_shapes", output_shapes=(C + 1,))
    assert "expected shapes" in failure.summary


# ---- check_parallel ---------------------------------------------------------------------------

XP = np.random.default_rng(1).normal(size=(16, F)).astype(np.float32)
YP = np.random.default_rng(2).integers(0, C, size=16).astype(np.int32)


@pytest.mark.parametrize("name", ["linen BN + dropout", "nnx BN + dropout", "linen tuple inputs"])
def test_check_parallel_passes_on_correct_models(name):
    model, inputs = {"linen BN + dropout": (TinyBNDropout(classes=C), XP),
                     "nnx BN + dropout": (NnxBNDropout(nnx.Rngs(0)), XP),
                     "linen tuple inputs": (TwoInputs(), (np.arange(16 * 5).reshape(16, 5) % 16,
                                                          np.full(16, 5.0, np.float32)))}[name]
    report = jnn.testing.check_parallel(model, inputs, YP, devices=8)
    print(report)
    assert report.passed and not report.subprocess
    references = {(r.path, r.reference) for r in report.results}
    if name != "linen tuple inputs":  # both models draw dropout masks: pmap is compared twice
        assert ("pmap", "single-device jit, dropout off on both") in references
        assert any(path == "pmap" and "per-device masks" in ref for path, ref in references)
    assert {r.path for r in report.results} == set(jnn.testing._parallel.PATHS)


class HandWrittenBN(nn.Module):
    """Normalises with the batch's own mean and variance, with no cross-device axis: per-device
    statistics under pmap and shard_map (sharded jit sees the global batch)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16)(x)
        h = (h - h.mean(0, keepdims=True)) / jnp.sqrt(h.var(0, keepdims=True) + 1e-5)
        return nn.Dense(C)(nn.relu(h))


def test_check_parallel_catches_unsynchronised_statistics():
    with pytest.raises(jnn.testing.ModelCheckError) as caught:
        jnn.testing.check_parallel(HandWrittenBN(), XP, YP, devices=8)
    assert sorted(f.summary.split()[0] for f in caught.value.failures) == ["pmap", "shard_map"]
    assert caught.value.failures[0].where.startswith("['params']")
    print(caught.value)


def test_check_parallel_refuses_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match="12 examples over 8 devices"):
        jnn.testing.check_parallel(TinyMLP(), XP[:12], YP[:12], devices=8)


@pytest.mark.slow
def test_check_parallel_from_a_process_with_one_device(tmp_path):
    """A user's test suite on a laptop: JAX already started with one CPU device."""
    script = tmp_path / "one_device.py"
    script.write_text(textwrap.dedent("""
        import jax, numpy as np, jnn
        from tests._tiny import TinyBNDropout
        assert jax.device_count() == 1
        x = np.random.default_rng(1).normal(size=(16, 5)).astype(np.float32)
        y = np.random.default_rng(2).integers(0, 3, size=16).astype(np.int32)
        report = jnn.testing.check_parallel(TinyBNDropout(), x, y, devices=8)
        print(report)
        assert report.subprocess and report.passed
    """))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(pathlib_root())
    done = subprocess.run([sys.executable, str(script)], cwd=str(pathlib_root()), env=env, capture_output=True,
                          text=True, timeout=300)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0


def pathlib_root():
    import pathlib  # noqa: PLC0415

    return pathlib.Path(__file__).resolve().parents[1]


# ---- the pytest entry point -------------------------------------------------------------------


@pytest.mark.slow
def test_model_tests_gives_one_pytest_test_per_check(tmp_path):
    test_file = tmp_path / "test_user_model.py"
    test_file.write_text(textwrap.dedent("""
        import numpy as np, jnn
        from tests._tiny import TinyBNDropout, TinyMLP
        x = np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32)
        y = np.random.default_rng(2).integers(0, 3, size=8).astype(np.int32)
        test_tiny = jnn.testing.model_tests(TinyMLP(), x, y, parallel=True, devices=2)
    """))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                           "--rootdir", str(tmp_path), str(test_file)], cwd=str(pathlib_root()),
                          capture_output=True, text=True, timeout=300)
    print(done.stdout[-3000:])
    assert done.returncode == 0
    # 11 checks + parallel; the MLP has no batch statistics and no randomness: 2 not applicable
    assert "10 passed, 2 skipped" in done.stdout


SEEN: list = []  # the optimisation setting each trace of `FlagProbe` ran under


class FlagProbe(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        SEEN.append(jax.config.read("jax_disable_most_optimizations"))
        return nn.Dense(C)(x)


@pytest.mark.parametrize("before", [False, True])
def test_checks_compile_without_backend_optimisations_and_put_the_setting_back(before):
    """check_model, check_parallel and model_tests compile under `jax_disable_most_optimizations`
    on CPU (fast_compile=True), then put back what the program had, also when a check fails;
    fast_compile=False leaves the setting alone."""
    jax.config.update("jax_disable_most_optimizations", before)  # the autouse fixture restores it
    SEEN.clear()
    jnn.testing.check_model(FlagProbe(), X, Y, checks=("finite", "jit_matches_eager"))
    assert SEEN and all(SEEN), SEEN
    assert jax.config.read("jax_disable_most_optimizations") is before
    SEEN.clear()
    _failure(FlagProbe(), output_shapes=(C + 1,), checks="output_shapes")  # a failing check
    assert SEEN and all(SEEN), SEEN
    assert jax.config.read("jax_disable_most_optimizations") is before
    SEEN.clear()
    jnn.testing.check_model(FlagProbe(), X, Y, checks="finite", fast_compile=False)
    assert SEEN and set(SEEN) == {before}, SEEN
    SEEN.clear()
    jnn.testing.check_parallel(FlagProbe(), X[:8], Y[:8], devices=2, steps=1, paths=("data_parallel",))
    assert SEEN and all(SEEN), SEEN
    assert jax.config.read("jax_disable_most_optimizations") is before


def test_check_parallel_subprocess_compiles_as_asked(tmp_path):
    """What `check_parallel`'s subprocess runs (`_main`, here in this process): it applies the
    `fast_compile` it is sent."""
    import pickle

    from jnn.testing import _parallel

    for fast in (True, False):
        request, answer = tmp_path / f"request{fast}.pkl", tmp_path / f"answer{fast}.pkl"
        args = dict(model=FlagProbe(), inputs=X[:8], labels=Y[:8], loss_fn="cross_entropy", devices=2, steps=1,
                    paths=("data_parallel",), rtol=1e-5, atol=1e-6, precision=None, train_kwarg="auto",
                    config={}, fast_compile=fast)
        request.write_bytes(pickle.dumps(args))
        jax.config.update("jax_disable_most_optimizations", False)
        SEEN.clear()
        _parallel._main(str(request), str(answer))
        assert SEEN and set(SEEN) == {fast}, SEEN
        assert pickle.loads(answer.read_bytes()).passed
