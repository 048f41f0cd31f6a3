"""Every numerical tolerance the tests use, named, in one place. Never loosen one to pass a test."""

# float64 finite-difference gradient checks (jax.test_util.check_grads and our own comparisons).
GRAD_CHECK_ATOL = 1e-5
GRAD_CHECK_RTOL = 1e-5
FINITE_DIFF_EPS = 1e-6

# Two float32 computations of the same arithmetic in a different order (jit vs eager, fused vs not).
F32_REORDER_RTOL = 1e-5
F32_REORDER_ATOL = 1e-6

# Values compared against an independent reference (sklearn, numpy formulas) in float32.
F32_REFERENCE_ATOL = 1e-5

# The same float32 training run spread over devices (sharded jit, pmap, shard_map, FSDP, several
# processes) vs one device, after 10 Adam steps: only the order of the cross-device sums differs.
# Observed max |diff| ~4e-7 on parameters of size O(1), i.e. a few ulps; see tests/test_parallel.py.
PARALLEL_RTOL = 1e-6
PARALLEL_ATOL = 1e-6
