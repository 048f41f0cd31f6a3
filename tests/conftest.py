"""Strict JAX for every test, and 8 fake CPU devices for the parallel tests.

XLA_FLAGS must be set before JAX initialises its backend, so this runs at import time.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The `jnn` command caches compiled programs on disk; tests stay hermetic without it.
os.environ.setdefault("JNN_COMPILATION_CACHE", "")

import jax  # noqa: E402

# Implicit rank promotion hides shape bugs: (B,) + (B, 1) silently becomes (B, B).
jax.config.update("jax_numpy_rank_promotion", "raise")

# Property-based tests: derandomised (reproducible) and bounded, the same in CI and locally.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
