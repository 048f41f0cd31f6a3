"""Strict JAX for every test, 8 fake CPU devices for the parallel tests, and one compilation cache.

XLA_FLAGS must be set before JAX initialises its backend, so this runs at import time.
"""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The `jnn` command caches compiled programs on disk; tests stay hermetic without it.
os.environ.setdefault("JNN_COMPILATION_CACHE", "")
# One persistent compilation cache for the whole run: pytest sets it here before it starts its
# xdist workers, which inherit it, as does every process a test starts. A program one test
# compiled is loaded by the next test that builds the same one, instead of compiled again (the
# suite's models repeat: test_loop, test_step and test_model took 114 s instead of 182 s). Only
# programs that took 0.1 s or more to compile are written: eager ops, thousands of tiny programs,
# made the eager and property tests 3-6x slower with every program written. A size limit turns on JAX's file
# lock, so two workers never read a half-written entry. A run that sets JAX_COMPILATION_CACHE_DIR
# itself keeps its own (an empty value turns the cache off).
_CACHE_CREATED = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_CREATED = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jnn-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

import jax  # noqa: E402

# Implicit rank promotion hides shape bugs: (B,) + (B, 1) silently becomes (B, B).
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402

# Property-based tests: derandomised (reproducible) and bounded, the same in CI and locally.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_unconfigure(config):
    if _CACHE_CREATED and not hasattr(config, "workerinput"):  # the process that made it removes it
        shutil.rmtree(_CACHE_CREATED, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """The slow tests first (a stable sort: files keep their order). With `--maxschedchunk 1`
    (pyproject.toml), pytest-xdist hands each worker one test at a time, so the two workers share
    the slow tests at the start and the short ones fill in after them: the run no longer ends with
    one worker on a long test while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _fast_compile(request):
    """Tests marked `fast_compile` compile with `jax_disable_most_optimizations` (XLA's backend
    optimisation level 0: LLVM's optimisations off, the same HLO passes), then the previous setting.

    They compile many small programs and run each a few times. Measured on this 2-core machine,
    `-n 2`: 17 of the marked files took 658 s of test time instead of 894 s; a tiny MLP's train step
    compiles in 0.33 s instead of 0.50 s. Tests that run many steps stay unmarked:
    under the flag in every test, the QAT test took 78 s instead of under 8, and the whole suite
    gained nothing. Processes that tests start are not affected.
    """
    from jnn.testing._case import compiling_fast  # what jnn.testing's checks compile under

    with compiling_fast(request.node.get_closest_marker("fast_compile") is not None):
        yield  # the previous setting comes back after (JAX_DISABLE_MOST_OPTIMIZATIONS=1 stays on)
