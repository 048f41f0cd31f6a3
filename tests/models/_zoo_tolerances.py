"""Every numerical tolerance of the model-zoo tests, in one place (never loosen one to pass)."""

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
