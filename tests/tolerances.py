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

# ---- The model zoo's tests (tests/models/) ----

# jit vs op-by-op execution of the same float32 model: only XLA fusion reorders arithmetic.
JIT_RTOL = 1e-5
JIT_ATOL = 1e-5

# jax.test_util.check_grads in float64 (finite differences with eps=1e-6 against autodiff).
GRAD_EPS = 1e-6
GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-5

# bfloat16 compute vs float32 compute of the same float32 parameters: bf16 keeps 8 mantissa bits
# (relative step 2**-8 = 0.0039); a few layers of accumulated rounding stay within a few percent
# of the output scale.
BF16_RTOL = 5e-2
BF16_ATOL = 5e-2

# A reference implementation computed differently in float32 (e.g. naive attention).
F32_RTOL = 1e-5
F32_ATOL = 1e-5

# A training test passes when the final loss is at most this fraction of the initial loss.
TRAIN_LOSS_RATIO = 0.5

# ---- Weights from other libraries and exported models (tests/test_pretrained.py, tests/test_export.py) ----

# A zoo model with another library's weights vs that library's own float32 forward pass (PyTorch), and
# an exported model in its runtime vs JAX: max |difference| / max |reference logit|. The bar.
PARITY_RTOL = 1e-5
